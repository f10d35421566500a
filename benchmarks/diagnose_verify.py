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


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--sets", default="none,each,all")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    from rewriter import optimize, registry, report
    from rewriter.optimize import _SESSIONS

    device = "cuda" if torch.cuda.is_available() else "cpu"
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
        spread, _ = rel(before[1], again[1])
        drift, drift_worst = rel(before[1], after[1])
        ours, ours_worst = rel(before[1], rewritten[1])
        print(
            f"{label:<22} applied {sum(rep.counts().values()):>3}  check: loss {w.loss_error:.1e} grads "
            f"{w.grad_error:.1e} worst {w.grad_worst} (spread {w.spread_grad:.1e}) | original vs itself "
            f"{spread:.1e}; after optimize {drift:.1e} ({drift_worst}); rewritten {ours:.1e} ({ours_worst}) "
            f"loss {before[0]:.5f} -> {rewritten[0]:.5f}; state changed: {changed[:3] or 'none'}",
            flush=True,
        )
        del model, session, snapshot
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
