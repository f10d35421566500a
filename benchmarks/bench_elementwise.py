"""RMSNorm, RoPE and SwiGLU: our kernels against PyTorch eager (HF's math), torch.compile of
that eager code, and Liger's autograd Functions, forward and forward+backward.

Llama-3-8B shapes in bf16: hidden 4096, intermediate 14336, 32 q heads over 8 kv heads of
head_dim 128, at 4096 and 16384 tokens (sequences of 2048). LoRA training is what we model:
the norm weight is frozen (no dw), q and k are transposed views of the projection outputs
(gradients are taken with respect to the projection outputs, so a layout copy in backward
counts), cos/sin are HF's (1, S, D) tables from positions. Ours runs RoPE in place, as
patterns/rope.py chooses where q and k are projection outputs read by RoPE alone (Liger's
Function always works in place); --candidates also times the out-of-place flavour.

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

    python benchmarks/bench_elementwise.py --candidates --out elementwise.json   # H200: about 1 minute
    TRITON_INTERPRET=1 python benchmarks/bench_elementwise.py --smoke   # tiny, CPU

--ops limits the run to some ops; --candidates adds the alternatives of ours that make_cases
lists (module settings and functions, each checked bit for bit against ours) to the same
timing passes.

The table comes last: per op, tokens and mode, microseconds of each variant, our GB/s and
share of the copy bandwidth, and the fastest other variant over ours (> 1: we are faster).
Twice: wall time per call as do_bench measures it, which on a slow host is mostly Python and
autograd launch overhead for the smaller ops, then GPU time per call from CUDA graph replays
(GraphTimer below: every variant's graph replayed in each of --passes interleaved passes, the
median kept), which is what the kernels themselves cost inside a training step whose host
runs ahead of the GPU. The candidates' table follows.
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
OPS = ("rmsnorm", "rope", "swiglu")


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
    # alternatives of ours, timed in the same passes: label -> (module settings, fn)
    candidates: dict[str, tuple[dict, Callable]] = field(default_factory=dict)

    def fresh(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone().requires_grad_(n in self.wrt) for n, t in self.base.items()}


def make_cases(
    shape: dict, device: torch.device, liger: dict, ops: tuple[str, ...] = OPS, with_candidates: bool = False
) -> list[Case]:
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
        # ours as the patterns choose it here: q and k are projection outputs that rope alone
        # reads, so rope runs in place (patterns/rope.py proves that from the graph)
        ours["rope"] = rope_views(functools.partial(rope, inplace=True))
        candidates = {
            "rope": {
                "out of place": ({}, rope_views(rope)),
                "q then k": ({"kernels.rope.LOADS_FIRST": False}, ours["rope"]),
                "bwd 2 tokens": ({"kernels.rope.TILE_BACKWARD": 4096}, ours["rope"]),
            },
        }
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
            if op not in ops:
                continue
            fns = {"ours": ours[op], "eager": eager[op], "compile": torch.compile(eager[op], dynamic=False)}
            if op in liger:
                fns["liger"] = rope_views(liger[op]) if op == "rope" else liger[op]
            cases.append(Case(op, T, base, wrt, fwd, bwd, fns, candidates.get(op, {}) if with_candidates else {}))
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


class GraphTimer:
    """GPU time of calls without the host's launch overhead: each call is captured `calls`
    times, each after an L2 flush, into one CUDA graph; a graph of the flushes alone is the
    baseline. Every pass replays the baseline and each graph (the median of 7 replays); a
    call's time is the median over passes of (graph - baseline) / calls. Passes interleave
    the variants, so clock drift hits them alike."""

    def __init__(self, device: torch.device, calls: int):
        self.device, self.calls = device, calls
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}
        self.calls_kept: dict[object, Callable] = {}  # a graph reads its call's inputs: keep them
        self.times: dict[object, list[float]] = {}
        self.baseline = self._capture(None)

    def _capture(self, fn: Callable | None) -> torch.cuda.CUDAGraph:
        if fn is not None:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up off the capturing stream, as capture requires
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.calls):
                self.flush.zero_()
                if fn is not None:
                    fn()
        return graph

    def add(self, key: object, fn: Callable) -> None:
        self.graphs[key] = self._capture(fn)
        self.calls_kept[key] = fn
        self.times[key] = []

    @staticmethod
    def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def run(self, passes: int) -> dict[object, list[float]]:
        """Per key, the ms of one call in each pass."""
        for _ in range(passes):
            base = self._replay_ms(self.baseline)
            for key, graph in self.graphs.items():
                self.times[key].append((self._replay_ms(graph) - base) / self.calls)
        return self.times


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_case(case: Case, device: torch.device, passes: int, calls: int) -> tuple[list[dict], list[dict]]:
    """Rows for each variant and mode (checked against eager, wall time, GPU time), and rows
    for each candidate of ours (checked against ours bit for bit, GPU time), the GPU times
    from the same interleaved passes."""
    import importlib

    cotangents = grad_outputs(case)
    reference = {
        "fwd": as_tuple(case.fns["eager"](**case.fresh())),
        "fwd+bwd": forward_backward(case, case.fns["eager"], case.fresh(), cotangents),
    }
    timer = GraphTimer(device, calls) if device.type == "cuda" else None

    def call_of(fn, mode):
        inputs = case.fresh()  # in-place variants (Liger) only ever touch their own copy
        if mode == "fwd":
            return lambda: fn(**inputs)
        cots = tuple(c.clone() for c in cotangents)  # an in-place backward writes over its cotangents
        return lambda: forward_backward(case, fn, inputs, cots)

    def settings(values: dict):
        saved = []
        for key, value in values.items():
            module_name, name = key.rsplit(".", 1)
            module = importlib.import_module(module_name)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
        return saved

    def restore(saved):
        for module, name, value in reversed(saved):
            setattr(module, name, value)

    def error(exc: Exception) -> str:
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"

    rows, candidate_rows = [], []
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
                got = as_tuple(fn(**case.fresh())) if mode == "fwd" else call_of(fn, mode)()
                row["max_rel_err"] = max_rel_err(got, reference[mode])
                del got
                row["ms"] = time_ms(call_of(fn, mode), device)
                row["GBps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                row["status"] = "ok"
                if timer is not None:
                    try:
                        timer.add(row_key(row), call_of(fn, mode))
                    except Exception as exc:  # noqa: BLE001 - a variant that cannot be captured keeps its wall time
                        row["gpu_error"] = error(exc)[7:]
            except Exception as exc:  # noqa: BLE001 - one broken variant must not stop the rest
                row["status"] = error(exc)
    ours = {mode: call_of(case.fns["ours"], mode)() for mode in ("fwd", "fwd+bwd")}
    for label, (values, fn) in case.candidates.items():
        for mode in ("fwd", "fwd+bwd"):
            row = dict(op=case.op, tokens=case.tokens, mode=mode, candidate=label, settings=values)
            row["bytes"] = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
            candidate_rows.append(row)
            saved = settings(values)
            try:
                got = call_of(fn, mode)()
                same = all(torch.equal(g, o) for g, o in zip(got, ours[mode], strict=True))
                row["check"] = "bit-identical to ours" if same else f"differs: {max_rel_err(got, ours[mode]):.1e}"
                del got
                if timer is not None:
                    timer.add(row_key(row), call_of(fn, mode))
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001
                row["status"] = error(exc)
            finally:
                restore(saved)
    del ours
    if timer is not None:
        measured = timer.run(passes)
        for row in rows + candidate_rows:
            if row_key(row) in measured:
                row["gpu_ms_passes"] = measured[row_key(row)]
                row["gpu_ms"] = statistics.median(measured[row_key(row)])
                row["gpu_GBps"] = row["bytes"] / (row["gpu_ms"] * 1e-3) / 1e9
    for row in rows + candidate_rows:
        print(
            f"  {case.op:<8} {case.tokens:>6} {row['mode']:<8} {row.get('variant') or row['candidate']:<18} "
            + (f"max rel err vs eager {row['max_rel_err']:.1e}" if "max_rel_err" in row else row.get("check", ""))
            + (f"  {row['ms'] * 1e3:9.1f} us" if "ms" in row else f"  {row['status']}")
            + (f"  GPU {row['gpu_ms'] * 1e3:9.1f} us" if row.get("gpu_ms") else "")
            + (f"  (no CUDA graph: {row['gpu_error']})" if "gpu_error" in row else ""),
            flush=True,
        )
    return rows, candidate_rows


def row_key(row: dict) -> tuple:
    return (row["op"], row["tokens"], row["mode"], row.get("variant"), row.get("candidate"))


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


def candidate_table(rows: list[dict], candidate_rows: list[dict]) -> str:
    """fwd+bwd GPU us of each candidate of ours, against the default and the fastest other."""
    lines = [
        "Candidates of ours (GPU us per call, same passes as the table above)",
        f"{'op':<8} {'tokens':>6} {'candidate':<18} {'fwd':>8} {'fwd+bwd':>8} {'ours':>8} {'best other':>10} {'other/cand':>10}",
    ]
    for c in candidate_rows:
        if c["mode"] != "fwd+bwd" or not c.get("gpu_ms"):
            continue
        same = [r for r in rows if (r["op"], r["tokens"], r["mode"]) == (c["op"], c["tokens"], "fwd+bwd")]
        fwd = [
            r
            for r in candidate_rows
            if (r["op"], r["tokens"], r["candidate"], r["mode"]) == (c["op"], c["tokens"], c["candidate"], "fwd")
        ]
        ours = next((r.get("gpu_ms") for r in same if r["variant"] == "ours"), None)
        others = [r["gpu_ms"] for r in same if r["variant"] != "ours" and r.get("gpu_ms")]
        fwd_us = f"{fwd[0]['gpu_ms'] * 1e3:>8.1f}" if fwd and fwd[0].get("gpu_ms") else f"{'-':>8}"
        ours_us = f"{ours * 1e3:>8.1f}" if ours else f"{'-':>8}"
        best = f"{min(others) * 1e3:>10.1f} {min(others) / c['gpu_ms']:>9.3f}x" if others else f"{'-':>10} {'-':>10}"
        lines.append(
            f"{c['op']:<8} {c['tokens']:>6} {c['candidate']:<18} {fwd_us} {c['gpu_ms'] * 1e3:>8.1f} {ours_us} {best}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    parser.add_argument("--candidates", action="store_true", help="also time the candidates of ours (make_cases)")
    parser.add_argument("--passes", type=int, default=5, help="interleaved timing passes over the CUDA graphs")
    parser.add_argument("--calls", type=int, default=10, help="calls (each after an L2 flush) per CUDA graph")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = SMOKE if args.smoke else LLAMA_8B
    ops = tuple(op for op in args.ops.split(",") if op)
    liger, liger_status = load_liger()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device {name}; torch {torch.__version__}, triton {triton.__version__}, liger-kernel {liger_status}")
    hbm = copy_bandwidth(device, 2 << 30 if device.type == "cuda" else 16 << 20)
    print(f"device-to-device copy: {hbm:.0f} GB/s (bytes read + written)")
    start = time.perf_counter()
    rows, candidate_rows = [], []
    for case in make_cases(shape, device, liger, ops, args.candidates):
        got, candidates = run_case(case, device, args.passes, args.calls)
        rows += got
        candidate_rows += candidates
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print(f"checked and timed in {time.perf_counter() - start:.0f} s\n")
    print(
        table(rows, hbm, "ms", "Wall time per call (do_bench median, L2 flushed; includes the host's launch overhead)")
    )
    if device.type == "cuda":
        title = f"GPU time per call (CUDA graphs of {args.calls} calls, L2 flushed, median of {args.passes} interleaved passes)"
        print("\n" + table(rows, hbm, "gpu_ms", title))
        if candidate_rows:
            print("\n" + candidate_table(rows, candidate_rows))
    if args.out:
        meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, liger=liger_status)
        args.out.write_text(
            json.dumps(dict(meta, copy_GBps=hbm, shape=shape, results=rows, candidates=candidate_rows), indent=2)
        )


if __name__ == "__main__":
    main()
