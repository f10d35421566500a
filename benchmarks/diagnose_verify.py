"""Which rewrite makes the whole-model check fail on a GPU: the 8B QLoRA shape cut to a few
layers, optimized with no pattern, each pattern alone, then all of them, on a 2048 x 2 batch.

For each set it prints the whole-model check (loss and all-gradient relative errors, the worst
parameter, the original's spread against itself) and two checks that the check itself can be
trusted: whether optimize() changed any parameter or buffer of the model, and whether the
original forward, run again after optimize(), still gives the gradients it gave before.

    python benchmarks/diagnose_verify.py --layers 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_e2e import SHAPES, TARGETS, batches, build_model  # noqa: E402


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return loss.item(), grads


def rel(a: dict, b: dict) -> tuple[float, str]:
    num = den = 0.0
    worst, worst_name = -1.0, ""
    for name in a.keys() | b.keys():
        x, y = a.get(name), b.get(name)
        x = x if x is not None else torch.zeros_like(y)
        y = y if y is not None else torch.zeros_like(x)
        d = (x - y).norm().item()
        num, den = num + d * d, den + x.norm().item() ** 2
        if d > worst:
            worst, worst_name = d, name
    return (num / den) ** 0.5 if den else num**0.5, worst_name


def by_group(a: dict, b: dict) -> str:
    """Relative gradient differences per projection and per quarter of the layers."""
    import re

    groups: dict[str, list[float]] = {}
    layers = 1 + max((int(m.group(1)) for n in a if (m := re.search(r"layers\.(\d+)\.", n))), default=0)
    for name, x in a.items():
        m = re.search(r"layers\.(\d+)\..*?(q|k|v|o|gate|up|down)_proj\.lora_(A|B)", name)
        if not m:
            continue
        key = f"{m.group(2)}.{m.group(3)} L{4 * int(m.group(1)) // layers}"
        y = b.get(name, torch.zeros_like(x))
        acc = groups.setdefault(key, [0.0, 0.0])
        acc[0] += (x - y).norm().item() ** 2
        acc[1] += x.norm().item() ** 2
    return " ".join(f"{k}:{(d / n) ** 0.5 if n else d**0.5:.1e}|{n**0.5:.1e}" for k, (d, n) in sorted(groups.items()))


def sdpa_check(device: str) -> None:
    """SDPA at the 8B attention shape: a materialised causal bool mask against is_causal=True,
    each against float64, forward and every input gradient (GQA by enable_gqa)."""
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    B, H, KV, S, D = 2, 32, 8, 2048, 128
    q, k, v = (torch.randn(B, h, S, D, device=device, generator=gen) for h in (H, KV, KV))
    dy = torch.randn(B, H, S, D, device=device, generator=gen)
    mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None].expand(B, 1, S, S)
    results = {}
    for name, dtype, kwargs in (
        ("fp64", torch.float64, dict(is_causal=True)),
        ("causal", torch.bfloat16, dict(is_causal=True)),
        ("masked", torch.bfloat16, dict(attn_mask=mask)),
        ("masked fp64", torch.float64, dict(attn_mask=mask)),
    ):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*ins, enable_gqa=True, **kwargs)
        out.backward(dy.to(dtype))
        results[name] = [out.detach().double()] + [t.grad.double() for t in ins]
    for name in ("causal", "masked", "masked fp64"):
        errs = [((x - r).norm() / r.norm()).item() for x, r in zip(results[name], results["fp64"])]
        print(f"sdpa {name:<12} rel err vs fp64: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--sets", default="none,each,all")
    parser.add_argument("--sdpa", action="store_true", help="first, SDPA masked vs is_causal against float64")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from rewriter import optimize, registry, report
    from rewriter.optimize import _SESSIONS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sdpa:
        sdpa_check(device)
    shape = dict(SHAPES["llama8b"], num_hidden_layers=args.layers)
    batch = next(batches(shape, args.seq, 2, 1, device))
    names = [p.name for p in registry.patterns_for("llama")]
    sets = []
    for kind in args.sets.split(","):
        sets += {"none": [[]], "each": [[n] for n in names], "all": [None]}[kind]
    for chosen in sets:
        torch.manual_seed(0)
        model = build_model(shape, device)
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        model.train()
        before = loss_and_grads(model, batch)
        again = loss_and_grads(model, batch)
        snapshot = state(model)
        optimize(model, sample=batch, patterns=chosen)
        rep = report(model)
        changed = [k for k, v in state(model).items() if k not in snapshot or not torch.equal(v, snapshot[k])]
        session = _SESSIONS[model.base_model.model]
        session.bypass = True
        after = loss_and_grads(model, batch)
        session.bypass = False
        rewritten = loss_and_grads(model, batch)
        w = rep.whole_model
        label = "all" if chosen is None else ("none" if not chosen else chosen[0])
        label += f" L{args.layers}"
        spread, _ = rel(before[1], again[1])
        drift, drift_worst = rel(before[1], after[1])
        ours, ours_worst = rel(before[1], rewritten[1])
        print(
            f"{label:<40} applied {sum(rep.counts().values()):>3}  check: loss {w.loss_error:.1e} grads "
            f"{w.grad_error:.1e} worst {w.grad_worst} (spread {w.spread_grad:.1e}) | original vs itself "
            f"{spread:.1e}; after optimize {drift:.1e} ({drift_worst}); rewritten {ours:.1e} ({ours_worst}) "
            f"loss {before[0]:.5f} -> {rewritten[0]:.5f}; state changed: {changed[:3] or 'none'}",
            flush=True,
        )
        print(f"  groups rewritten vs original: {by_group(before[1], rewritten[1])}", flush=True)
        print(f"  groups original vs itself:    {by_group(before[1], again[1])}", flush=True)
        print(str(rep), file=sys.stderr, flush=True)
        del model, session, snapshot
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
