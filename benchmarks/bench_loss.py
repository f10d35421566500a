"""lm_head + causal-LM cross-entropy, forward + backward: time and peak memory on one GPU.

Variants: eager (HF's math: F.linear in bf16, `.float()`, cross_entropy), torch.compile of the
same, Liger's fused linear cross entropy (if importable), and graft's linear_cross_entropy.
Each variant's loss, dx (and dW) is first checked against eager and against a float64
reference (chunked, exact math); a variant that disagrees is reported and not timed.

    python benchmarks/bench_loss.py --out bench_loss.json     # H200: vocab 128256, hidden 4096
    TRITON_INTERPRET=1 python benchmarks/bench_loss.py --smoke  # tiny, on the CPU

Timing: triton.testing.do_bench (median ms) on CUDA, perf_counter median on the CPU. Memory:
torch.cuda.max_memory_allocated during one forward + backward minus what was allocated
before (the inputs); the returned gradients are counted, for every variant alike."""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import time_ms  # noqa: E402

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402

IGNORED_FRACTION = 0.05  # labels set to -100 (padding, masked prompt)
# A variant passes the check when it is this close to eager (relative norm of the difference).
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-3, 3e-2


def liger_variant():
    """Liger's fused linear cross entropy, or the reason it is missing."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda x, w, y: liger_fused_linear_cross_entropy(x, w, y, reduction="mean")
    except Exception as first:  # noqa: BLE001 - any import failure means "missing"
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def call(x, w, y):
                out = LigerFusedLinearCrossEntropyFunction.apply(x, w, y)
                return out[0] if isinstance(out, tuple) else out

            return call
        except Exception:  # noqa: BLE001
            return f"missing ({type(first).__name__}: {first})"


def variants() -> dict:
    return {
        "eager": linear_cross_entropy_reference,
        "torch.compile": torch.compile(linear_cross_entropy_reference, dynamic=False),
        "liger": liger_variant(),
        "graft": linear_cross_entropy,
    }


def make_inputs(tokens: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype, generator=gen) * hidden**-0.5
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    ignored = torch.rand(tokens, device=device, generator=gen) < IGNORED_FRACTION
    return x, w, labels.masked_fill(ignored, -100)


def forward_backward(fn, x, w, labels, weight_grad: bool):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_(weight_grad)
    loss = fn(x, w, labels)
    grads = torch.autograd.grad(loss, (x, w) if weight_grad else (x,))
    return (loss.detach(), *grads)


def reference_fp64(x, w, labels, weight_grad: bool, chunk: int = 2048):
    """Loss, dx, dW in float64, chunked over tokens so the fp64 logits never all exist."""
    x64, w64 = x.double(), w.double()
    valid = labels != -100
    n = valid.sum().clamp_min(1).double()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    dx = torch.empty_like(x64)
    dw = torch.zeros_like(w64) if weight_grad else None
    for s in range(0, x.shape[0], chunk):
        z = x64[s : s + chunk] @ w64.t()
        y, v = labels[s : s + chunk], valid[s : s + chunk]
        lse = torch.logsumexp(z, dim=-1)
        safe = torch.where(v, y, 0)[:, None]
        total += ((lse - z.gather(1, safe)[:, 0]) * v).sum()
        g = torch.exp(z - lse[:, None])
        g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))
        g *= (v / n)[:, None]
        dx[s : s + chunk] = g @ w64
        if weight_grad:
            dw += g.t() @ x64[s : s + chunk]
        del z, g
    return (total / n, dx, dw) if weight_grad else (total / n, dx)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def peak_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak


def bench_case(tokens, args, dtype, device, weight_grad, fns) -> list[dict]:
    x, w, labels = make_inputs(tokens, args.hidden, args.vocab, dtype, device, seed=tokens)
    names = ("loss", "dx", "dW") if weight_grad else ("loss", "dx")
    ref = reference_fp64(x, w, labels, weight_grad)
    eager = forward_backward(fns["eager"], x, w, labels, weight_grad)
    eager_err = {n: rel(e, r) for n, e, r in zip(names, eager, ref)}
    rows = []
    for name, fn in fns.items():
        row = {"variant": name, "tokens": tokens, "weight_grad": weight_grad}
        rows.append(row)
        if isinstance(fn, str):
            row["status"] = fn
            continue
        try:
            out = forward_backward(fn, x, w, labels, weight_grad)
            row["vs_eager"] = {n: rel(o, e) for n, o, e in zip(names, out, eager)}
            row["err_fp64"] = {n: rel(o, r) for n, o, r in zip(names, out, ref)}
            row["eager_err_fp64"] = eager_err
            del out
            tolerances = [LOSS_TOLERANCE] + [GRAD_TOLERANCE] * (len(names) - 1)
            bad = [n for n, t in zip(names, tolerances) if not row["vs_eager"][n] <= t]
            if bad:
                row["status"] = f"MISMATCH vs eager in {', '.join(bad)}"
                continue

            def step(fn=fn):
                return forward_backward(fn, x, w, labels, weight_grad)

            row["ms"] = time_ms(step, device, args.rep_ms)
            row["peak_bytes"] = peak_bytes(step, device)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one broken variant must not end the benchmark
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            traceback.print_exc(limit=3)
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
    del ref, eager
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'tokens':>6} {'dW':>3} {'variant':<14} {'ms':>8} {'peak MiB':>9} {'x eager ms':>10} "
    head += f"{'loss err/eager':>16} {'dx err/eager':>16} {'dW err/eager':>16}  status"
    lines = [head]
    eager_ms = {(r["tokens"], r["weight_grad"]): r.get("ms") for r in rows if r["variant"] == "eager"}
    for r in rows:
        ms, peak = r.get("ms"), r.get("peak_bytes")
        base = eager_ms.get((r["tokens"], r["weight_grad"]))
        speed = f"{base / ms:.2f}" if ms and base else "-"
        errs = []
        for n in ("loss", "dx", "dW"):
            if "err_fp64" in r and n in r["err_fp64"]:
                errs.append(f"{r['err_fp64'][n]:.1e}/{r['eager_err_fp64'][n]:.1e}")
            else:
                errs.append("-")
        lines.append(
            f"{r['tokens']:>6} {'y' if r['weight_grad'] else 'n':>3} {r['variant']:<14} "
            f"{(f'{ms:.2f}' if ms else '-'):>8} {(f'{peak / 2**20:.0f}' if peak is not None else '-'):>9} "
            f"{speed:>10} {errs[0]:>16} {errs[1]:>16} {errs[2]:>16}  {r['status']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, TRITON_INTERPRET=1)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--weight-grad", choices=["no", "yes", "both"], default="both", help="lm_head trainable")
    parser.add_argument("--rep-ms", type=int, default=400, help="do_bench repetition time per variant")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.vocab, args.hidden = [37, 100], 1000, 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    fns = variants()
    started = time.perf_counter()
    rows = []
    modes = {"no": [False], "yes": [True], "both": [False, True]}[args.weight_grad]
    for weight_grad in modes:
        for tokens in args.tokens:
            rows += bench_case(tokens, args, dtype, device, weight_grad, fns)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "dtype": args.dtype,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.out:
        args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(json.dumps(info))
    print(table(rows))


if __name__ == "__main__":
    main()
