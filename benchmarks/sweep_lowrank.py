"""Sweep of kernels/lowrank.py's launch configurations at Llama-8B's LoRA shapes (r = 16).

For each op (down, grad, grad_and_down, up_add) and shape, at M = 4096 and 16384 tokens: the
shipped config (lowrank.CONFIGS), the one that shipped before (lowrank.LEGACY: 64 x 64 tiles,
chained parts), the code of an older commit when git can show it (--baseline), a bounded list of
candidates and eager fp32 PyTorch (what PEFT runs: x.float() @ A.t() and the like). Each is
timed by replaying a CUDA graph of one call with a 256 MiB write before each replay (L2 flushed),
CUDA events around the replay, median of --reps. Reported per row: microseconds, GB/s of the bytes
the op must move (its activation once, factors and outputs; up_add reads and writes Y), that
against --peak-gbs, the error against float64 (largest normwise relative error over segments)
and its ratio to eager's (the tests allow down and grad 2x eager's, a bf16 up_add 1x; rows past
that are marked BAD; NONDET where two calls differ in a bit), and the launch plan (parts: st
stacked, ch chained; tiles; warps; stages; grid). Last, per op, each candidate's time summed over
the shapes of one M, against the default's: the pick for lowrank.CONFIGS.

    python benchmarks/sweep_lowrank.py --out sweep.json          # ~1 minute on an H200
    python benchmarks/sweep_lowrank.py --ops grad --m 4096 --reps 50
    TRITON_INTERPRET=1 python benchmarks/sweep_lowrank.py --smoke  # CPU, tiny shapes: the plumbing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANK = 16
SCALE = 2.0
BASELINE = "9f0f2e5"  # the last commit before the stacked-parts kernels

# Candidates per op: (name, config overrides of lowrank.CONFIGS[op]). "default" (CONFIGS itself)
# and, for down and grad, "legacy" (lowrank.LEGACY) come first. parts stays "auto" (stacked up to
# rank 32, chained above) except in the two rows that force one.
CANDIDATES = {
    "down": [
        ("bm64 s4 pps4", dict(block_m=64, num_stages=4, programs_per_sm=4.0)),
        ("bm128 s3 pps3", dict(num_stages=3, programs_per_sm=3.0)),
        ("bm128 bk32 s6", dict(block_k=32, num_stages=6)),
        ("bm256 w8 pps1", dict(block_m=256, num_warps=8, programs_per_sm=1.0)),
        ("chained", dict(parts="chained")),
        ("stacked", dict(parts="stacked")),
    ],
    "grad": [
        ("bk128 s4 pps3", dict(num_stages=4, programs_per_sm=3.0)),
        ("bk256 w8 pps1", dict(block_k=256, num_warps=8, programs_per_sm=1.0)),
        ("bm32 s5", dict(block_m=32, num_stages=5)),
        ("bk64 s4 pps4", dict(block_k=64, num_stages=4, programs_per_sm=4.0)),
        ("chained", dict(parts="chained")),
        ("stacked", dict(parts="stacked")),
    ],
    "grad_and_down": [
        ("sub2 w4", dict(sub=2, num_warps=4)),
        ("sub4 s2 pps1", dict(sub=4, num_stages=2, programs_per_sm=1.0)),
        ("sub2 w8 pps3", dict(sub=2, num_warps=8, programs_per_sm=3.0)),
    ],
    "up_add": [
        ("bm128 bn128 w8", dict(block_m=128, block_n=128, num_warps=8)),
        ("bm64 bn256 w8", dict(block_m=64, block_n=256, num_warps=8)),
        ("bm128 bn64 w4", dict(block_m=128, block_n=64, num_warps=4)),
    ],
}


def segments(k, bounds):
    cuts = [0, *bounds, k]
    return list(zip(cuts, cuts[1:]))


# Shapes: (op, name, K or N, total rank of u / rows of P, bounds, note). Ranks and layouts are
# those of lora.py's calls: P = A (R, K) contiguous in the forward, B.t() (a transposed view of
# the stacked B (N, 16)) in the backward; u of a stacked gradient holds one rank-16 factor a segment.
SHAPES = [
    ("down", "x A^T qkv", 4096, 48, (), "A"),
    ("down", "x A^T down_proj", 14336, 16, (), "A"),
    ("down", "D B qkv (seg)", 6144, 16, (4096, 5120), "B.t()"),
    ("down", "D B gate|up (seg)", 28672, 16, (14336,), "B.t()"),
    ("grad", "u^T x dA qkv", 4096, 48, (), ""),
    ("grad", "u^T x dA o", 4096, 16, (), ""),
    ("grad", "u^T x dA down_proj", 14336, 16, (), ""),
    ("grad", "u^T D dB qkv (seg)", 6144, 48, (4096, 5120), ""),
    ("grad", "u^T D dB gate|up (seg)", 28672, 32, (14336,), ""),
    ("grad_and_down", "D qkv (seg)", 6144, 48, (4096, 5120), ""),
    ("grad_and_down", "D o", 4096, 16, (), ""),
    ("grad_and_down", "D gate|up (seg)", 28672, 32, (14336,), ""),
    ("up_add", "Y gate|up (seg) round_first", 28672, 32, (14336,), ""),
]


def make_inputs(op, k, rtot, bounds, layout, m, device, gen):
    def randn(*shape, std=1.0):
        return torch.randn(*shape, device=device, generator=gen) * std

    x = randn(m, k).to(torch.bfloat16)
    if op == "down":
        p = randn(rtot, k, std=k**-0.5) if layout == "A" else randn(k, rtot, std=0.01).t()
        return dict(x=x, p=p)
    if op == "grad":
        return dict(x=x, u=randn(m, rtot))
    if op == "grad_and_down":
        return dict(x=x, u=randn(m, rtot), bt=randn(k, RANK, std=0.01).t())
    v = randn(k, RANK, std=0.01)
    return dict(y=x, u=randn(m, rtot), v=v)


def rank_of(op, rtot, bounds):
    return RANK if bounds else rtot


def scales_of(bounds):
    return tuple(SCALE for _ in range(len(bounds) + 1)) if bounds else SCALE


def ours(lowrank, op, t, bounds, rtot, config, legacy_module=False):
    """A callable running lowrank's op on inputs t (up_add on a copy made outside the call)."""
    s, r = scales_of(bounds), rank_of(op, rtot, bounds)
    kw = {} if legacy_module else dict(config=config)
    if op == "down":
        return lambda: lowrank.down(t["x"], t["p"], s, bounds, **kw)
    if op == "grad":
        return lambda: lowrank.grad(t["x"], t["u"], s, bounds, rank=r, **kw)
    if op == "grad_and_down":
        if config == "separate":  # the two calls, as lora.py makes them now
            return lambda: (lowrank.grad(t["x"], t["u"], s, bounds, rank=r), lowrank.down(t["x"], t["bt"], s, bounds))
        return lambda: lowrank.grad_and_down(t["x"], t["u"], t["bt"], s, bounds, rank=r, **kw)
    return lambda: lowrank.up_add_(t["y_run"], t["u"], t["v"], s, round_first=True, bounds=bounds, **kw)


def eager(op, t, bounds, rtot):
    """What PEFT's eager autograd computes: fp32 copies of the activation, fp32 matmuls."""
    r, segs = rank_of(op, rtot, bounds), segments(t["x"].shape[1], bounds)

    def down():
        return torch.cat([(t["x"][:, a:b].float() @ t["p"][:, a:b].t()) * SCALE for a, b in segs], dim=1)

    def grad():
        u = t["u"]
        return torch.cat(
            [(u[:, i * r : (i + 1) * r].t() @ t["x"][:, a:b].float()) * SCALE for i, (a, b) in enumerate(segs)], 1
        )

    def both():
        x, u, bt = t["x"], t["u"], t["bt"]
        db = [(u[:, i * r : (i + 1) * r].t() @ x[:, a:b].float()) * SCALE for i, (a, b) in enumerate(segs)]
        g = [(x[:, a:b].float() @ bt[:, a:b].t()) * SCALE for a, b in segs]
        return torch.cat(db, dim=1), torch.cat(g, dim=1)

    def up_add():
        y, u, v = t["y_run"], t["u"], t["v"]
        for i, (a, b) in enumerate(segs):
            y[:, a:b] += ((u[:, i * r : (i + 1) * r] @ v[a:b].t()) * SCALE).to(y.dtype)
        return y

    return dict(down=down, grad=grad, grad_and_down=both, up_add=up_add)[op]


def call_twice(op, fn, t):
    """fn's result, and whether a second call gives the same bits (up_add: on fresh copies of Y)."""
    results = []
    for _ in range(2):
        if op == "up_add":
            t["y_run"] = t["y"].clone()
        out = fn()
        results.append([o.clone() for o in out] if isinstance(out, tuple) else [out.clone()])
    same = all(torch.equal(a, b) for a, b in zip(*results))
    return (tuple(results[0]) if len(results[0]) > 1 else results[0][0]), same


def references(op, t, bounds, rtot):
    """float64 results, per segment: (output index, rows, columns, reference)."""
    r, segs = rank_of(op, rtot, bounds), segments(t["x"].shape[1], bounds)
    x, every = t["x"].double(), slice(None)
    refs = []
    for i, (a, b) in enumerate(segs):
        cols, u_cols = slice(a, b), slice(i * r, (i + 1) * r)
        if op in ("grad", "grad_and_down"):
            refs.append((0, every, cols, (t["u"][:, u_cols].double().t() @ x[:, cols]) * SCALE))
        if op in ("down", "grad_and_down"):
            p = t["p"] if op == "down" else t["bt"]
            refs.append((0 if op == "down" else 1, every, u_cols, (x[:, cols] @ p[:, cols].double().t()) * SCALE))
        if op == "up_add":
            refs.append((0, every, cols, x[:, cols] + (t["u"][:, u_cols].double() @ t["v"][cols].double().t()) * SCALE))
    return refs


def error(out, refs):
    """Largest normwise relative error against float64 over the segments (and outputs)."""
    outs = out if isinstance(out, tuple) else (out,)
    worst = 0.0
    for index, rows, cols, ref in refs:
        ours = outs[index][rows, cols].double()
        worst = max(worst, ((ours - ref).norm() / ref.norm().clamp_min(1e-300)).item())
    return worst


def moved_bytes(op, m, k, rtot, bounds):
    count, r = len(bounds) + 1, rank_of(op, rtot, bounds)
    if op == "down":
        return m * k * 2 + rtot * k * 4 + m * count * rtot * 4
    if op == "grad":
        return m * k * 2 + m * rtot * 4 + r * k * 4
    if op == "grad_and_down":
        return m * k * 2 + m * rtot * 4 + 2 * r * k * 4 + m * count * r * 4
    return 2 * m * k * 2 + m * rtot * 4 + k * r * 4


def time_us(fn, reps, device, flush):
    """Median microseconds of fn: a CUDA graph of one call replayed after an L2 flush, CUDA events
    around each replay; on the CPU a few wall-clock calls (the smoke run checks plumbing only)."""
    if device.type != "cuda":  # fn has run (call_twice)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6, "wall"
    fn()
    torch.cuda.synchronize()
    graph, how = None, "graph"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except Exception as exc:  # time the calls themselves
        print(f"  (no CUDA graph: {type(exc).__name__}: {exc})", file=sys.stderr)
        graph, run, how = None, fn, "calls"
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events), how


def load_baseline(rev: str):
    """kernels/lowrank.py as of git revision rev, as a module (None where git cannot show it)."""
    try:
        text = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:kernels/lowrank.py"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / f"lowrank_{rev}.py"  # Triton reads the kernels' source from a file
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"lowrank_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan_text(lowrank, op, m, k, rtot, bounds, config, device):
    if op == "up_add":
        cfg = dict(lowrank.CONFIGS["up_add"], **(config or {}))
        return f"{cfg['block_m']}x{cfg['block_n']} w{cfg['num_warps']}"
    try:
        pl = lowrank.plan(op, m, k, rank_of(op, rtot, bounds), bounds, torch.bfloat16, device, config)
    except (AttributeError, ValueError, KeyError):
        return ""
    parts = {0: "ex", 1: "ch", 2: "st"}.get(pl["parts"], "?")
    tiles = f"{pl['block_m']}x{pl['block_k']}" + (f"x{pl['sub']}" if "sub" in pl else "")
    grid = "x".join(str(g) for g in pl["grid"])
    return f"{parts} {tiles} w{pl['num_warps']} s{pl['num_stages']} grid {grid}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="down,grad,grad_and_down,up_add")
    parser.add_argument("--m", default="4096,16384", help="token counts")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--max-candidates", type=int, default=None, help="per op, after default and legacy")
    parser.add_argument("--baseline", default=BASELINE, help="git revision timed as 'old@REV' ('' for none)")
    parser.add_argument("--peak-gbs", type=float, default=4200.0, help="the memory roofline of the %% column")
    parser.add_argument("--out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (K / 32, M = 64), one op call each")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ imports triton's jit
    from kernels import lowrank

    device = torch.device("cuda" if cuda else "cpu")
    ops = args.ops.split(",")
    ms = [64] if args.smoke else [int(v) for v in args.m.split(",")]
    shrink = 32 if args.smoke else 1
    old = load_baseline(args.baseline) if args.baseline and not args.smoke else None
    if args.baseline and not args.smoke and old is None:
        print(f"(git cannot show {args.baseline}:kernels/lowrank.py here: no old@ rows)", file=sys.stderr)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None
    gen = torch.Generator(device=device)
    rows, t_start = [], time.perf_counter()
    for op, name, k_full, rtot, bounds_full, layout in SHAPES:
        if op not in ops:
            continue
        k, bounds = k_full // shrink, tuple(b // shrink for b in bounds_full)
        cands = [("default", None)] + ([("legacy", lowrank.LEGACY[op])] if op in ("down", "grad") else [])
        cands += CANDIDATES[op][: args.max_candidates]
        if op == "grad_and_down":
            cands.insert(1, ("grad+down", "separate"))
        for m in ms:
            gen.manual_seed(m + k)
            t = make_inputs(op, k, rtot, bounds, layout, m, device, gen)
            t["x"] = t.get("x", t.get("y"))
            e_fn = eager(op, t, bounds, rtot)
            runs = [("eager fp32", e_fn, None)]
            if old is not None and op != "grad_and_down":
                runs.append((f"old@{args.baseline}", ours(old, op, t, bounds, rtot, None, legacy_module=True), None))
            runs += [(c, ours(lowrank, op, t, bounds, rtot, cfg), cfg) for c, cfg in cands]
            gbytes = moved_bytes(op, m, k, rtot, bounds)
            refs, err_eager = references(op, t, bounds, rtot), None
            for cand, fn, cfg in runs:
                try:
                    first, again = call_twice(op, fn, t)
                    err = error(first, refs)
                    us, how = time_us(fn, args.reps, device, flush)
                except Exception as exc:  # a candidate that does not compile or launch is reported, not fatal
                    print(f"{op} {name} M={m} {cand}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    rows.append(dict(op=op, shape=name, m=m, k=k, cand=cand, failed=f"{type(exc).__name__}: {exc}"))
                    continue
                if cand == "eager fp32":
                    err_eager = err
                # tests/numerics.py's bar: 2x eager's error for fp32 results, 1x for bf16 (plus a sliver)
                out_dtype = torch.bfloat16 if op == "up_add" else torch.float32
                bound = (1.0 if op == "up_add" else 2.0) * err_eager + torch.finfo(out_dtype).eps / 32
                row = dict(
                    op=op, shape=name, m=m, k=k, bounds=list(bounds), rank_total=rtot, cand=cand,
                    config=cfg if isinstance(cfg, dict) else None, us=us, timing=how,
                    gbs=gbytes / us / 1e3, roofline=gbytes / us / 1e3 / args.peak_gbs,
                    err=err, err_eager=err_eager, ok=err <= bound, deterministic=again,
                    plan=plan_text(lowrank, op, m, k, rtot, bounds, cfg if isinstance(cfg, dict) else None, device)
                    if not cand.startswith(("eager", "old", "grad+down")) else "",
                )  # fmt: skip
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            del t, refs
            if cuda:
                torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_start
    print_table(rows, elapsed)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows=rows, seconds=elapsed, device=str(device)), indent=1))


def print_table(rows, elapsed):
    good = [r for r in rows if "us" in r]
    print(
        f"\n{'op':14} {'shape':28} {'M':>6} {'candidate':18} {'us':>9} {'GB/s':>6} {'%roof':>5} {'err':>8} {'x eager':>7}  plan"
    )
    best = {}
    for r in good:
        key = (r["op"], r["shape"], r["m"])
        valid = r["ok"] and r["deterministic"] and not r["cand"].startswith("eager")
        if valid and (key not in best or r["us"] < best[key]):
            best[key] = r["us"]
    for r in good:
        mark = "*" if best.get((r["op"], r["shape"], r["m"])) == r["us"] else " "
        ratio = r["err"] / r["err_eager"] if r["err_eager"] else float("nan")
        flag = ("" if r["ok"] else " BAD") + ("" if r["deterministic"] else " NONDET")
        print(
            f"{r['op']:14} {r['shape'][:28]:28} {r['m']:>6} {r['cand'][:18]:18} {r['us']:>8.1f}{mark} {r['gbs']:>6.0f}"
            f" {100 * r['roofline']:>4.0f}% {r['err']:>8.1e} {ratio:>7.2f}  {r['plan']}{flag}"
        )
    for r in rows:
        if "failed" in r:
            print(f"{r['op']:14} {r['shape'][:28]:28} {r['m']:>6} {r['cand'][:18]:18} FAILED {r['failed'][:80]}")
    # each candidate's total over an op's shapes at one M, against the default's (the pick for CONFIGS)
    print("\ntotal over the shapes, per op and M (us; x default; BAD: over the error bar or NONDET somewhere)")
    groups = {}
    for r in good:
        groups.setdefault((r["op"], r["m"]), {}).setdefault(r["cand"], []).append(r)
    for (op, m), cands in groups.items():
        shapes = {r["shape"] for rs in cands.values() for r in rs}
        base = sum(r["us"] for r in cands.get("default", [])) or math.nan
        line = []
        for cand, rs in sorted(cands.items(), key=lambda kv: sum(r["us"] for r in kv[1])):
            if len(rs) != len(shapes):
                continue
            total = sum(r["us"] for r in rs)
            bad = "" if all(r["ok"] and r["deterministic"] for r in rs) else " BAD"
            line.append(f"{cand} {total:.0f} ({total / base:.2f}){bad}")
        print(f"  {op} M={m}: " + "; ".join(line))
    print(f"\n{len(good)} timings in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
