"""RMSNorm, RoPE and SwiGLU: our kernels against PyTorch eager (HF's math), torch.compile of
that eager code, and Liger's autograd Functions, forward and forward+backward.

Llama-3-8B shapes in bf16: hidden 4096, intermediate 14336, 32 q heads over 8 kv heads of
head_dim 128, at 4096 and 16384 tokens (sequences of 2048). LoRA training is what we model:
the norm weight is frozen (no dw), q and k are transposed views of the projection outputs
(gradients are taken with respect to the projection outputs, so a layout copy in backward
counts), cos/sin are HF's (1, S, D) tables from positions.

Before timing, every variant's outputs and input gradients are checked against eager's on
fresh copies of the same inputs (max |x - eager| / max |eager|, printed); a variant that
raises or is missing is reported, never fatal. Timing: triton.testing.do_bench, median (it
flushes the L2 before every call). Achieved bandwidth is the bytes each op must move (below)
over its time, against a device-to-device copy's (bytes read + written) on the same card.

Bytes each op must move (T tokens, b = 2 bytes per bf16 element):
    rmsnorm  fwd: read x, w; write y and one fp32 rstd per row    2 T H b + H b + 4 T
             bwd: read dy, x, w, rstd; write dx (w frozen)         3 T H b + H b + 4 T
    rope     fwd: read q, k, cos, sin; write q_embed, k_embed      2 T (Hq + Hk) D b + 2 S D b
             bwd: read dq_embed, dk_embed, cos, sin; write dq, dk  the same
    swiglu   fwd: read gate, up; write h                           3 T I b
             bwd: read dh, gate, up; write dgate, dup              5 T I b
    fwd+bwd: the sum of the two.

    python benchmarks/bench_elementwise.py --out elementwise.json   # H200: about 2 minutes
    TRITON_INTERPRET=1 python benchmarks/bench_elementwise.py --smoke   # tiny, CPU

The table comes last: per op, tokens and mode, microseconds of each variant, our GB/s and
share of the copy bandwidth, and the fastest other variant over ours (> 1: we are faster).
Twice: wall time per call as do_bench measures it, which on a slow host is mostly Python and
autograd launch overhead for the smaller ops, then GPU time per call from CUDA graph replays
(graph_ms below), which is what the kernels themselves cost inside a training step whose
host runs ahead of the GPU.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from common import time_ms  # noqa: E402

from kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402
from kernels.rope import rope, rope_reference  # noqa: E402
from kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

LLAMA_8B = dict(hidden=4096, intermediate=14336, heads_q=32, heads_k=8, head_dim=128, seq=2048, tokens=(4096, 16384))
SMOKE = dict(hidden=256, intermediate=352, heads_q=4, heads_k=2, head_dim=64, seq=24, tokens=(48,))
EPS = 1e-5
VARIANTS = ("ours", "eager", "compile", "liger")


def load_liger() -> tuple[dict[str, Callable], str]:
    """Liger's Functions, called by their parameter names (0.8.5: RMSNorm(X, W, eps, offset,
    casting_mode, in_place, row_mode), Rope(q, k, cos, sin, position_ids, unsqueeze_dim,
    rotary_dim), SiLUMul(a, b, ...)), or why they are missing."""
    try:
        import liger_kernel
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as exc:  # noqa: BLE001 - any import failure means "missing"
        return {}, f"missing ({type(exc).__name__}: {exc})"

    def by_name(function, **values):
        names = list(inspect.signature(function.forward).parameters)[1:]  # without ctx
        args = []
        for name in names:
            if name not in values:
                break
            args.append(values[name])
        return function.apply(*args)

    ops = {
        # casting_mode "llama" is HF's; in_place=False keeps dy intact (same bytes either way)
        "rmsnorm": lambda x, w: by_name(
            LigerRMSNormFunction, X=x, W=w, eps=EPS, offset=0.0, casting_mode="llama", in_place=False
        ),
        "rope": lambda q, k, cos, sin: by_name(LigerRopeFunction, q=q, k=k, cos=cos, sin=sin),
        "swiglu": lambda gate, up: by_name(LigerSiLUMulFunction, a=gate, b=up),
    }
    return ops, getattr(liger_kernel, "__version__", "installed")


@dataclass
class Case:
    op: str
    tokens: int
    base: dict[str, torch.Tensor]  # input values; each run gets fresh copies
    wrt: tuple[str, ...]  # inputs whose gradients backward computes
    bytes_fwd: int
    bytes_bwd: int
    fns: dict[str, Callable] = field(default_factory=dict)  # variant -> fn(**inputs) -> outputs

    def fresh(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone().requires_grad_(n in self.wrt) for n, t in self.base.items()}


def make_cases(shape: dict, device: torch.device, liger: dict) -> list[Case]:
    dt, b = torch.bfloat16, 2
    H, Ii, Hq, Hk, D, S = (shape[k] for k in ("hidden", "intermediate", "heads_q", "heads_k", "head_dim", "seq"))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dt)

    def rope_views(fn):
        """q, k as LlamaAttention makes them: transposed views of the projection outputs."""

        def run(q_proj, k_proj, cos, sin):
            B = q_proj.shape[0]
            q = q_proj.view(B, S, Hq, D).transpose(1, 2)
            k = k_proj.view(B, S, Hk, D).transpose(1, 2)
            return fn(q, k, cos, sin)

        return run

    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    freqs = torch.arange(S, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, S, D), as LlamaRotaryEmbedding returns it
    cases = []
    for T in shape["tokens"]:
        B = T // S
        eager = {
            "rmsnorm": lambda x, w: rmsnorm_reference(x, w, EPS),
            "rope": rope_views(rope_reference),
            "swiglu": swiglu_reference,
        }
        ours = {"rmsnorm": lambda x, w: rmsnorm(x, w, EPS), "rope": rope_views(rope), "swiglu": swiglu}
        specs = [
            ("rmsnorm", {"x": randn(T, H, scale=3), "w": randn(H, scale=0.3) + 1}, ("x",),
             2 * T * H * b + H * b + 4 * T, 3 * T * H * b + H * b + 4 * T),
            ("rope", {"q_proj": randn(B, S, Hq * D), "k_proj": randn(B, S, Hk * D),
                      "cos": emb.cos().to(dt), "sin": emb.sin().to(dt)}, ("q_proj", "k_proj"),
             2 * T * (Hq + Hk) * D * b + 2 * S * D * b, 2 * T * (Hq + Hk) * D * b + 2 * S * D * b),
            ("swiglu", {"gate": randn(T, Ii, scale=3), "up": randn(T, Ii)}, ("gate", "up"),
             3 * T * Ii * b, 5 * T * Ii * b),
        ]  # fmt: skip
        for op, base, wrt, fwd, bwd in specs:
            fns = {"ours": ours[op], "eager": eager[op], "compile": torch.compile(eager[op], dynamic=False)}
            if op in liger:
                fns["liger"] = rope_views(liger[op]) if op == "rope" else liger[op]
            cases.append(Case(op, T, base, wrt, fwd, bwd, fns))
    return cases


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_outputs(case: Case) -> tuple[torch.Tensor, ...]:
    """The same cotangents for every variant, in the layout of eager's outputs (HF's layout)."""
    gen = torch.Generator(device=next(iter(case.base.values())).device).manual_seed(1)
    outs = as_tuple(case.fns["eager"](**case.fresh()))
    drawn = [torch.randn(o.shape, generator=gen, device=o.device).to(o.dtype) for o in outs]
    return tuple(torch.empty_like(o).copy_(d) for o, d in zip(outs, drawn))  # empty_like keeps the layout


def forward_backward(case: Case, fn: Callable, inputs: dict, cotangents) -> tuple[torch.Tensor, ...]:
    outs = as_tuple(fn(**inputs))
    grads = torch.autograd.grad(outs, [inputs[n] for n in case.wrt], cotangents)
    return outs + tuple(grads)


def max_rel_err(values, reference) -> float:
    worst = 0.0
    for v, r in zip(values, reference):
        r = r.float()
        worst = max(worst, ((v.float() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst


def graph_ms(fn: Callable, device: torch.device, calls: int = 10) -> float | None:
    """GPU time of one call without the host's launch overhead: CUDA graphs of `calls` x
    (L2 flush, fn) and of `calls` x (L2 flush) alone, replayed; the difference per call."""
    if device.type != "cuda":
        return None
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up off the capturing stream, as capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    medians = []
    for with_fn in (True, False):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                flush.zero_()
                if with_fn:
                    fn()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        medians.append(statistics.median(times))
        del graph
    return (medians[0] - medians[1]) / calls


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_case(case: Case, device: torch.device) -> list[dict]:
    cotangents = grad_outputs(case)
    reference = {
        "fwd": as_tuple(case.fns["eager"](**case.fresh())),
        "fwd+bwd": forward_backward(case, case.fns["eager"], case.fresh(), cotangents),
    }
    rows = []
    for variant in VARIANTS:
        for mode in ("fwd", "fwd+bwd"):
            row = dict(op=case.op, tokens=case.tokens, mode=mode, variant=variant)
            row["bytes"] = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
            rows.append(row)
            fn = case.fns.get(variant)
            if fn is None:
                row["status"] = "missing"
                continue
            try:
                if mode == "fwd":
                    got = as_tuple(fn(**case.fresh()))
                else:
                    got = forward_backward(case, fn, case.fresh(), cotangents)
                row["max_rel_err"] = max_rel_err(got, reference[mode])
                del got
                inputs = case.fresh()  # in-place variants (Liger) only ever touch their own copy
                if mode == "fwd":
                    call = lambda fn=fn, inputs=inputs: fn(**inputs)  # noqa: E731
                else:
                    call = lambda fn=fn, inputs=inputs: forward_backward(case, fn, inputs, cotangents)  # noqa: E731
                row["ms"] = time_ms(call, device)
                row["GBps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                row["status"] = "ok"
                try:
                    row["gpu_ms"] = graph_ms(call, device)
                except Exception as exc:  # noqa: BLE001 - a variant that cannot be captured keeps its wall time
                    row["gpu_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                if row.get("gpu_ms"):
                    row["gpu_GBps"] = row["bytes"] / (row["gpu_ms"] * 1e-3) / 1e9
            except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the rest
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(
                f"  {case.op:<8} {case.tokens:>6} {mode:<8} {variant:<8} "
                + (f"max rel err vs eager {row['max_rel_err']:.1e}" if "max_rel_err" in row else "")
                + (f"  {row['ms'] * 1e3:9.1f} us" if "ms" in row else f"  {row['status']}")
                + (f"  GPU {row['gpu_ms'] * 1e3:9.1f} us" if row.get("gpu_ms") else "")
                + (f"  (no CUDA graph: {row['gpu_error']})" if "gpu_error" in row else ""),
                flush=True,
            )
    return rows


def table(rows: list[dict], hbm: float, key: str, title: str) -> str:
    """One line per op, tokens and mode: each variant's microseconds under `key` ("ms" or
    "gpu_ms"), our GB/s and share of the copy bandwidth, and the fastest other over ours."""
    lines = [
        title,
        f"{'op':<8} {'tokens':>6} {'mode':<8} "
        + " ".join(f"{v + ' us':>11}" for v in VARIANTS)
        + f" {'ours GB/s':>10} {'% copy':>7} {'best other / ours':>18}",
    ]
    keys = list(dict.fromkeys((r["op"], r["tokens"], r["mode"]) for r in rows))
    for op, tokens, mode in keys:
        by = {r["variant"]: r for r in rows if (r["op"], r["tokens"], r["mode"]) == (op, tokens, mode)}
        cells = [f"{by[v][key] * 1e3:>11.1f}" if by[v].get(key) else f"{by[v]['status'][:11]:>11}" for v in VARIANTS]
        ours = by["ours"].get(key)
        others = [by[v][key] for v in VARIANTS[1:] if by[v].get(key)]
        gbps = by["ours"]["bytes"] / (ours * 1e-3) / 1e9 if ours else None
        cols = f"{gbps:>10.0f} {100 * gbps / hbm:>6.0f}%" if gbps else f"{'-':>10} {'-':>7}"
        ratio = f"{min(others) / ours:>17.2f}x" if ours and others else f"{'-':>18}"
        lines.append(f"{op:<8} {tokens:>6} {mode:<8} " + " ".join(cells) + f" {cols} {ratio}")
    return "\n".join(lines)


# Launch sizes tried by --sweep (module, constant, values): fwd+bwd GPU time of ours under each,
# to choose the defaults on the card rather than guess them.
SWEEP = {
    "rmsnorm": [("kernels.rmsnorm", "ELEMENTS_PER_PROGRAM", (2048, 4096, 8192, 16384, 32768))],
    "rope": [
        ("kernels.rope", "TILE_FORWARD", (1024, 2048, 4096, 8192)),
        ("kernels.rope", "TILE_BACKWARD", (1024, 2048, 4096, 8192)),
    ],
}


def sweep(shape: dict, device: torch.device) -> list[dict]:
    import importlib

    rows = []
    for case in make_cases(shape, device, {}):
        for module_name, constant, values in SWEEP.get(case.op, ()):
            module = importlib.import_module(module_name)
            default = getattr(module, constant)
            cotangents = grad_outputs(case)
            for value in values:
                setattr(module, constant, value)
                row = dict(op=case.op, tokens=case.tokens, constant=constant, value=value, default=default)
                for mode in ("fwd", "fwd+bwd"):
                    inputs = case.fresh()
                    fn = case.fns["ours"]
                    if mode == "fwd":
                        call = functools.partial(fn, **inputs)
                    else:
                        call = functools.partial(forward_backward, case, fn, inputs, cotangents)
                    row[mode] = graph_ms(call, device)
                print(
                    f"  sweep {case.op:<8} {case.tokens:>6} {constant}={value:<6} fwd {row['fwd'] * 1e3:7.1f} us"
                    f"  fwd+bwd {row['fwd+bwd'] * 1e3:7.1f} us" + ("  (default)" if value == default else ""),
                    flush=True,
                )
                rows.append(row)
            setattr(module, constant, default)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--sweep", action="store_true", help="also time ours under the launch sizes in SWEEP")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = SMOKE if args.smoke else LLAMA_8B
    liger, liger_status = load_liger()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device {name}; torch {torch.__version__}, triton {triton.__version__}, liger-kernel {liger_status}")
    hbm = copy_bandwidth(device, 2 << 30 if device.type == "cuda" else 16 << 20)
    print(f"device-to-device copy: {hbm:.0f} GB/s (bytes read + written)")
    start = time.perf_counter()
    rows = []
    for case in make_cases(shape, device, liger):
        rows += run_case(case, device)
    swept = sweep(shape, device) if args.sweep and device.type == "cuda" else []
    print(f"checked and timed in {time.perf_counter() - start:.0f} s\n")
    print(
        table(rows, hbm, "ms", "Wall time per call (do_bench median, L2 flushed; includes the host's launch overhead)")
    )
    if device.type == "cuda":
        title = "GPU time per call (CUDA graph replay, L2 flushed; no launch overhead): the kernels themselves"
        print("\n" + table(rows, hbm, "gpu_ms", title))
    if args.out:
        meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, liger=liger_status)
        args.out.write_text(json.dumps(dict(meta, copy_GBps=hbm, shape=shape, results=rows, sweep=swept), indent=2))


if __name__ == "__main__":
    main()
