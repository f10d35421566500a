"""4-bit dequantization: kernels/nf4.py against bitsandbytes' CUDA dequantize_4bit.

On the Llama-3-8B weight shapes (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down
4096x14336), quantized by bitsandbytes on the GPU as QLoRA does (nf4, double quantization,
blocksize 64, bf16). First every configuration (nf4/fp4, nested or not, blocksizes, dtypes, odd
shapes) is checked bit for bit against bitsandbytes; any difference exits with status 1 before
timing. Then each op is timed (triton.testing.do_bench, median; do_bench flushes the L2 before
every call) and its achieved bandwidth, bytes read (codes + absmax + nested absmax) plus bytes
written, is set against a device-to-device copy's (bytes read + written) on the same card.

    python benchmarks/bench_nf4.py --out nf4.json      # GPU, well under 2 minutes
    python benchmarks/bench_nf4.py --sweep             # also: tile size x num_warps of our kernel
    python benchmarks/bench_nf4.py --smoke             # tiny, CPU, Triton interpreter

The table comes last: per shape, microseconds and GB/s of bitsandbytes (functional call, as
Linear4bit makes it), ours from a QuantState (`dequantize_4bit`, what a caller without a cached
Nf4Weight pays) and our kernel alone (prebuilt Nf4Weight, reused out buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbf  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from common import time_ms  # noqa: E402

from kernels import nf4  # noqa: E402

LLAMA_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096)}
LLAMA_8B["down_proj"] = (4096, 14336)
SMOKE = {"tiny": (64, 256), "odd": (37, 192)}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def quantize(shape, dtype, quant_type, blocksize, nested, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def bytes_moved(weight: nf4.Nf4Weight) -> int:
    n = weight.numel
    read = (n + 1) // 2 + weight.absmax.numel() * weight.absmax.element_size()
    if weight.nested:
        read += weight.nested_absmax.numel() * 4 + 4  # absmax2 and the offset; the tables stay cached
    return read + n * torch.empty((), dtype=weight.dtype).element_size()


def verify(shapes: dict, device: torch.device) -> list[dict]:
    """Every configuration against bitsandbytes. On CUDA bit for bit; on CPU by value (bitsandbytes'
    CPU paths give FP4's zero a + sign where its CUDA kernel and we give -), rows of whole blocks only
    (its AVX512 CPU kernel mislays blocks that cross rows; see kernels/nf4.py)."""
    configs = [
        (shape, qt, nested, bs, dtype)
        for shape in list(shapes.values())[:2] + [(37, 192), (3, 333)]
        for qt in ("nf4", "fp4")
        for nested in (False, True)
        for bs in (64, 128, 4096)
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
        if device.type == "cuda" or shape[-1] % bs == 0
    ]
    configs.append((list(shapes.values())[-1], "nf4", True, 64, torch.bfloat16))
    results = []
    for i, (shape, qt, nested, bs, dtype) in enumerate(configs):
        packed, qs = quantize(shape, dtype, qt, bs, nested, device, seed=i)
        expected = bnbf.dequantize_4bit(packed, qs)
        ours = nf4.dequantize_4bit(packed, qs)
        if device.type == "cuda":
            differ = (ours.view(INT_VIEW[dtype]) != expected.view(INT_VIEW[dtype])).sum().item()
        else:
            differ = (ours != expected).sum().item()
        results.append(dict(shape=shape, quant_type=qt, nested=nested, blocksize=bs, dtype=str(dtype), differ=differ))
        if differ:
            print(f"MISMATCH {shape} {qt} nested={nested} blocksize={bs} {dtype}: {differ} values differ")
    return results


def memory_bandwidth(device: torch.device) -> tuple[float, float]:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written) and of a 1 GiB fill (bytes
    written): our op is 80% writes, so the fill is the nearer ceiling."""
    size = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = 2 * size / time_ms(lambda: dst.copy_(src), device, 200) / 1e6
    fill = size / time_ms(lambda: dst.fill_(7), device, 200) / 1e6
    return copy, fill


def time_shapes(shapes: dict, device: torch.device, copy_gbs: float) -> list[dict]:
    rows = []
    for name, shape in shapes.items():
        for qt, nested in (("nf4", True), ("nf4", False)):
            packed, qs = quantize(shape, torch.bfloat16, qt, 64, nested, device)
            weight = nf4.Nf4Weight.from_quant_state(packed, qs)
            buffer = torch.empty(shape, dtype=torch.bfloat16, device=device)
            moved = bytes_moved(weight)
            row = dict(name=name, shape=shape, quant_type=qt, nested=nested, bytes=moved)
            ops = {
                "bnb": lambda p=packed, q=qs: bnbf.dequantize_4bit(p, q),
                "ours_from_quant_state": lambda p=packed, q=qs: nf4.dequantize_4bit(p, q),
                "ours_kernel": lambda w=weight, b=buffer: nf4.dequantize(w, out=b),
            }
            # Round-robin, best of 3 medians: single medians here were seen 2-3x off now and then.
            times = {label: [] for label in ops}
            for _ in range(3):
                for label, fn in ops.items():
                    times[label].append(time_ms(fn, device, 200))
            for label, runs in times.items():
                ms = min(runs)
                row[label + "_us"] = ms * 1e3
                row[label + "_gbs"] = moved / ms / 1e6
            row["kernel_pct_of_copy"] = 100 * row["ours_kernel_gbs"] / copy_gbs
            rows.append(row)
    return rows


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def product(x: torch.Tensor, w: torch.Tensor, transpose: bool) -> torch.Tensor:
    return x @ (w if transpose else w.t())


def dequantize_then_matmul(x, packed, qs, transpose: bool) -> torch.Tensor:
    return product(x, bnbf.dequantize_4bit(packed, qs), transpose)


def time_matmuls(shapes: dict, device: torch.device, tokens: int) -> list[dict]:
    """matmul_4bit (W dequantized tile by tile on chip) against bitsandbytes' dequantize followed
    by cuBLAS, and cuBLAS alone on an already dequantized W (the floor of that approach), for the
    forward x @ W^T and the backward's dx = dy @ W; errors against float64 first."""
    rows = []
    for name, (n, k) in shapes.items():
        packed, qs = quantize((n, k), torch.bfloat16, "nf4", 64, True, device)
        weight = nf4.Nf4Weight.from_quant_state(packed, qs)
        w = bnbf.dequantize_4bit(packed, qs)
        for transpose in (False, True):
            gen = torch.Generator(device=device).manual_seed(n + k + transpose)
            x = torch.randn(tokens, n if transpose else k, generator=gen, device=device).to(torch.bfloat16)
            ref = product(x.double(), w.double(), transpose)
            eager = product(x, w, transpose)
            ours = nf4.matmul_4bit(x, weight, transpose)
            row = dict(name=name, shape=(n, k), tokens=tokens, product="x @ W" if transpose else "x @ W^T")
            row.update(err_ours=rel_err(ours, ref), err_eager=rel_err(eager, ref))
            ops = {
                "dequant_cublas": partial(dequantize_then_matmul, x, packed, qs, transpose),
                "cublas_only": partial(product, x, w, transpose),
                "ours": partial(nf4.matmul_4bit, x, weight, transpose),
            }
            times = {label: [] for label in ops}
            for _ in range(2):
                for label, fn in ops.items():
                    times[label].append(time_ms(fn, device, 200))
            for label, runs in times.items():
                row[label + "_us"] = min(runs) * 1e3
                row[label + "_tflops"] = 2 * tokens * n * k / min(runs) / 1e9
            rows.append(row)
    return rows


def sweep(shapes: dict, device: torch.device) -> list[dict]:
    """Tile (values per program) x num_warps for our kernel, nested nf4 bf16 at blocksize 64."""
    saved = nf4._TILE, nf4._WARPS
    rows = []
    weights = {}
    for name, shape in shapes.items():
        packed, qs = quantize(shape, torch.bfloat16, "nf4", 64, True, device)
        weights[name] = (
            nf4.Nf4Weight.from_quant_state(packed, qs),
            torch.empty(shape, dtype=torch.bfloat16, device=device),
        )
    for tile in (2048, 4096, 8192, 16384):
        for warps in (2, 4, 8):
            if tile // (32 * warps) < 8:  # fewer than 8 values per thread: 16-byte stores impossible
                continue
            nf4._TILE, nf4._WARPS = tile, warps
            row = dict(tile=tile, warps=warps)
            for name, (weight, buffer) in weights.items():
                ms = time_ms(lambda w=weight, b=buffer: nf4.dequantize(w, out=b), device, 200)
                row[name] = bytes_moved(weight) / ms / 1e6
            rows.append(row)
    nf4._TILE, nf4._WARPS = saved
    rows += sweep_matmul(shapes, device)
    print("\nsweep: GB/s of our kernel (nf4, nested, bf16, blocksize 64)")
    print(f"{'tile':>6} {'warps':>5} " + " ".join(f"{n:>14}" for n in shapes))
    for row in rows:
        if "tile" in row:
            print(f"{row['tile']:>6} {row['warps']:>5} " + " ".join(f"{row[n]:>14.0f}" for n in shapes))
    print("\nsweep: TFLOP/s of matmul_4bit at 4096 tokens (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)")
    for row in rows:
        if "config" in row:
            print(
                f"{row['product']:>8} {str(row['config']):>26} "
                + " ".join(f"{n} {v:.0f}" for n, v in row["tflops"].items())
            )
    return rows


MATMUL_CONFIGS = {
    False: [
        (128, 128, 64, 4, 3),
        (128, 128, 64, 4, 4),
        (128, 256, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 128, 128, 4, 3),
    ],
    True: [(128, 64, 128, 4, 3), (128, 64, 128, 4, 4), (128, 64, 64, 4, 3), (64, 64, 128, 4, 3), (128, 32, 128, 4, 3)],
}


def sweep_matmul(shapes: dict, device: torch.device, tokens: int = 4096) -> list[dict]:
    saved = nf4._matmul_config
    rows = []
    names = [name for name in shapes if shapes[name][0] * shapes[name][1] >= 1 << 24]
    operands = {}
    for name in names:
        packed, qs = quantize(shapes[name], torch.bfloat16, "nf4", 64, True, device)
        operands[name] = nf4.Nf4Weight.from_quant_state(packed, qs)
    for transpose, configs in MATMUL_CONFIGS.items():
        for bm, bn, bk, warps, stages in configs:
            config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            nf4._matmul_config = lambda weight, t, c=config: dict(c)
            tflops = {}
            for name, weight in operands.items():
                n, k = weight.shape
                x = torch.randn(tokens, n if transpose else k, device=device, dtype=torch.bfloat16)
                try:
                    ms = time_ms(partial(nf4.matmul_4bit, x, weight, transpose), device, 200)
                    tflops[name] = 2 * tokens * n * k / ms / 1e9
                except Exception as exc:  # out of shared memory, say: report, go on
                    print(f"config {config} failed: {type(exc).__name__}: {str(exc)[:100]}")
                    tflops[name] = 0.0
            rows.append(
                dict(product="x @ W" if transpose else "x @ W^T", config=(bm, bn, bk, warps, stages), tflops=tflops)
            )
    nf4._matmul_config = saved
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the full results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    parser.add_argument("--sweep", action="store_true", help="also sweep our kernel's tile size and num_warps")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE if args.smoke else LLAMA_8B
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}")

    checks = verify(shapes, device)
    bad = [c for c in checks if c["differ"]]
    print(f"bit-exact against bitsandbytes: {len(checks) - len(bad)}/{len(checks)} configurations")
    if bad:
        return 1
    copy_gbs, fill_gbs = memory_bandwidth(device)
    rows = time_shapes(shapes, device, copy_gbs)
    matmuls = time_matmuls(shapes, device, tokens=64 if args.smoke else 4096)
    sweep_rows = sweep(shapes, device) if args.sweep else []
    result = dict(device=name, copy_gbs=copy_gbs, fill_gbs=fill_gbs, checks=checks, timings=rows, sweep=sweep_rows)
    result["matmuls"] = matmuls
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))

    print(f"\ncopy {copy_gbs:.0f} GB/s (read + write), fill {fill_gbs:.0f} GB/s; bf16 out, blocksize 64; us, GB/s")
    header = f"{'weight':<14} {'shape':>12} {'dq':>3} {'bnb':>16} {'ours(qs)':>16} {'ours kernel':>16} {'copy%':>6} {'x bnb':>6}"
    print(header)
    for r in rows:
        cells = [
            f"{r[k + '_us']:7.1f} {r[k + '_gbs']:6.0f}   " for k in ("bnb", "ours_from_quant_state", "ours_kernel")
        ]
        shape = "x".join(map(str, r["shape"]))
        speedup = r["bnb_us"] / r["ours_kernel_us"]
        print(f"{r['name']:<14} {shape:>12} {'y' if r['nested'] else 'n':>3} {''.join(cells)}"[:-3], end="")
        print(f" {r['kernel_pct_of_copy']:5.0f}% {speedup:6.2f}")
    print(f"\nmatmul_4bit at {matmuls[0]['tokens']} tokens, nf4 nested bf16: us and TFLOP/s; error vs float64")
    print(
        f"{'weight':<14} {'product':>8} {'dequant+cuBLAS':>15} {'cuBLAS alone':>15} {'ours':>15} {'x dq+cuBLAS':>11} {'err ours/eager':>20}"
    )
    for r in matmuls:
        cells = "".join(
            f"{r[k + '_us']:8.0f} {r[k + '_tflops']:6.0f}" for k in ("dequant_cublas", "cublas_only", "ours")
        )
        speedup = r["dequant_cublas_us"] / r["ours_us"]
        print(f"{r['name']:<14} {r['product']:>8} {cells} {speedup:11.2f} {r['err_ours']:9.2e}/{r['err_eager']:9.2e}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
