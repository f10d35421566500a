"""Where optimize()'s GPU memory goes on the 8B QLoRA shape: each phase of the verification
(the original's loss and gradients twice, the capture with its per-match checks, the rewritten
model's loss and gradients) and each match's check, as allocated-before / peak-during /
held-after in GiB, from torch.cuda's allocator statistics.

It wraps graft's own phase functions (check_matches, check_match, _Session._loss_and_grads)
with meters; nothing else changes. The model is bench_e2e's (random NF4 weights, LoRA r=16 on
all seven projections).

    python benchmarks/optimize_memory.py --seq 2048 --batch 2 [--layers 32] [--checkpointing]
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_e2e import SHAPES, TARGETS, batches, build_model  # noqa: E402

GIB = 2**30


CUDA = torch.cuda.is_available()
_open: list[int] = []  # the running peak of each metered call in progress, outermost first


def _allocated() -> int:
    return torch.cuda.memory_allocated() if CUDA else 0


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def metered(fn, label_of, rows: list):
    """fn with the allocator's state recorded around each call: (label, before, peak, after,
    seconds). Calls nest (checks run inside a phase): resetting the peak for the inner call
    first folds the outer's peak so far into the outer's record."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        if _open:
            _open[-1] = max(_open[-1], _peak())
        before = _allocated()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        _open.append(before)
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        finally:
            if CUDA:
                torch.cuda.synchronize()
            peak = max(_open.pop(), _peak())
            if _open:
                _open[-1] = max(_open[-1], peak)
        rows.append((label_of(*args, **kwargs), before, peak, _allocated(), time.perf_counter() - t0))
        return out

    return wrapper


def live_tensors(top: int = 12) -> str:
    """The live CUDA tensors that Python can reach, by shape and dtype (parameters apart),
    and what refers to one of each of the largest groups."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensor

    groups: dict[tuple, list] = collections.defaultdict(list)
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and not isinstance(obj, (torch.nn.Parameter, FakeTensor)):
                groups[(tuple(obj.shape), str(obj.dtype))].append(obj)
        except Exception:  # noqa: BLE001 - some objects refuse isinstance
            continue
    size = {k: sum(t.untyped_storage().nbytes() for t in ts) for k, ts in groups.items()}
    lines = [f"live CUDA tensors reachable from Python: {sum(size.values()) / GIB:.2f} GiB"]
    for key in sorted(size, key=size.get, reverse=True)[:top]:
        referrers = []
        for r in gc.get_referrers(groups[key][0]):
            if r is groups[key] or type(r).__name__ == "frame":
                continue
            owners = [type(o).__name__ for o in gc.get_referrers(r) if type(o).__name__ not in ("frame", "list")][:3]
            keys = [str(k)[:24] for k in list(r)[:3]] if isinstance(r, dict) else []
            referrers.append(f"{type(r).__name__}{keys} in {owners}")
        lines.append(f"  {size[key] / GIB:7.2f} GiB  {len(groups[key]):4d} x {key}  referred to by {referrers[:3]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--vocab", type=int, help="a smaller vocabulary (a CPU smoke test)")
    parser.add_argument("--live", action="store_true", help="list the live tensors before the loss check")
    args = parser.parse_args()

    import importlib

    from peft import LoraConfig, get_peft_model

    from rewriter import optimize

    opt_mod = importlib.import_module("rewriter.optimize")  # the module, not the function of that name

    rows: list = []
    verify_mod = importlib.import_module("rewriter.verify")
    opt_mod.check_matches = metered(
        opt_mod.check_matches, lambda gm, ex, matches, *a: f"graph run + checks ({len(matches)} matches)", rows
    )
    check_match = metered(verify_mod.check_match, lambda gm, m, *a, **k: f"check {m.pattern.name}", rows)

    def check_and_report(gm, m, *a, **k):
        if args.live and m.pattern.name == "linear_cross_entropy":
            print(live_tensors(), flush=True)
        return check_match(gm, m, *a, **k)

    verify_mod.check_match = check_and_report
    calls = collections.Counter()

    def phase(self, model, sample, params, original=False, seed=0):
        calls["original" if original else "rewritten"] += 1
        return f"loss+grads {'original' if original else 'rewritten'} #{calls['original' if original else 'rewritten']}"

    opt_mod._Session._loss_and_grads = metered(opt_mod._Session._loss_and_grads, phase, rows)

    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    shape.update({"vocab_size": args.vocab} if args.vocab else {})
    device = "cuda" if CUDA else "cpu"
    model = build_model(shape, device)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    sample = next(iter(batches(shape, args.seq, args.batch, 1, device)))
    weights = _allocated()
    t0 = time.perf_counter()
    optimize(model, sample=sample)
    total = time.perf_counter() - t0
    peak = max(r[2] for r in rows)

    print(
        f"{args.shape} {shape['num_hidden_layers']} layers, {args.seq} x {args.batch}, checkpointing {args.checkpointing}"
    )
    print(f"model {weights / GIB:.2f} GiB; optimize() {total:.1f} s, peak of its phases {peak / GIB:.2f} GiB\n")
    print(f"{'phase':<34} {'calls':>5} {'before':>8} {'peak':>8} {'peak-before':>11} {'after':>8} {'s':>7}")
    grouped: dict[str, list] = {}
    for label, *rest in rows:
        grouped.setdefault(label, []).append(rest)
    for label, items in grouped.items():
        worst = max(items, key=lambda r: r[1] - r[0])
        secs = sum(r[3] for r in items)
        print(
            f"{label:<34} {len(items):>5} {worst[0] / GIB:>8.2f} {worst[1] / GIB:>8.2f} "
            f"{(worst[1] - worst[0]) / GIB:>11.2f} {worst[2] / GIB:>8.2f} {secs:>7.1f}"
        )


if __name__ == "__main__":
    main()
