"""The fused LoRA nodes against PEFT + bitsandbytes eager, at Llama-8B shapes (issue 4).

One decoder layer of the "8B QLoRA" workload (NF4, double quant, bf16 compute, LoRA r=16 with
PEFT's fp32 adapters): lora_qkv, lora_o and lora_mlp against the same PEFT modules called
eagerly, forward + backward on 4096 tokens. Each pair is checked first (max relative difference
of the output and of dx), then timed (CUDA events, median) and its peak memory measured
(max_memory_allocated above what was allocated before the call).

    python benchmarks/bench_lora.py --out lora.json
    python benchmarks/bench_lora.py --smoke      # tiny shape on CPU: the plumbing only
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_e2e import SHAPES, TARGETS, build_model  # noqa: E402


def layer_under_lora(shape: dict, device: str):
    from peft import LoraConfig, get_peft_model

    model = build_model(dict(shape, num_hidden_layers=1), device)
    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config).base_model.model.model.layers[0]


def timed(fn, repeats: int, device: str) -> tuple[float, float]:
    """Median seconds of fn() and its peak extra memory in GiB."""
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def lowrank_check(device: str, smoke: bool) -> list[dict]:
    """kernels/lowrank.py's products on this GPU at the 8B shapes: error against float64 next to
    eager's fp32 matmul's error (the bar: at most 1x, plus a sixteenth of an fp32 ulp), and
    time against that matmul."""
    from kernels import lowrank

    gen = torch.Generator(device=device).manual_seed(2)
    rows = []
    shapes = [(64, 128)] if smoke else [(4096, 4096), (4096, 14336), (16384, 4096)]
    for m, k in shapes:
        x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
        a = torch.randn(16, k, device=device, generator=gen) / k**0.5  # lora_A (fp32)
        u = torch.randn(m, 16, device=device, generator=gen)  # an fp32 rank-16 factor
        products = {
            "down": (lambda x, a, u: lowrank.down(x, a), lambda x, a, u: x.float() @ a.t(), lambda x, a, u: x.double() @ a.double().t()),
            "grad": (lambda x, a, u: lowrank.grad(x, u), lambda x, a, u: u.t() @ x.float(), lambda x, a, u: u.double().t() @ x.double()),
        }  # fmt: skip
        for op, fns in products.items():
            ours, eager, exact = (functools.partial(f, x, a, u) for f in fns)
            ref = exact()
            err = {n: ((f().double() - ref).norm() / ref.norm()).item() for n, f in (("ours", ours), ("eager", eager))}
            t_ours, _ = timed(ours, 10, device)
            t_eager, _ = timed(eager, 10, device)
            rows.append(
                dict(
                    op=op,
                    m=m,
                    k=k,
                    err_ours=err["ours"],
                    err_eager=err["eager"],
                    ours_us=t_ours * 1e6,
                    eager_us=t_eager * 1e6,
                )
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    from kernels.lora import lora_linears, lora_mlp
    from patterns.lora import projection

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    shape = SHAPES["tiny" if args.smoke else "llama8b"]
    tokens = 64 if args.smoke else args.tokens
    layer = layer_under_lora(shape, device)
    attn, mlp = layer.self_attn, layer.mlp
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, shape["hidden_size"], device=device, dtype=torch.bfloat16, generator=gen)

    def params(*modules):
        out = []
        for m in modules:
            out += [m.lora_A["default"].weight, m.lora_B["default"].weight, m.get_base_layer().bias]
        return out

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    mlp_layers = [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    nodes = {
        "lora_qkv": (
            lambda x: tuple(m(x) for m in qkv),
            lambda x: lora_linears(x, tuple(projection(m, x.dtype) for m in qkv), *params(*qkv)),
        ),
        "lora_o": (
            lambda x: attn.o_proj(x),
            lambda x: lora_linears(x, (projection(attn.o_proj, x.dtype),), *params(attn.o_proj))[0],
        ),
        "lora_mlp": (
            lambda x: mlp(x),
            lambda x: lora_mlp(x, *(projection(m, x.dtype) for m in mlp_layers), *params(*mlp_layers)),
        ),
    }
    checks = lowrank_check(device, args.smoke)
    results = []
    for name, (eager, ours) in nodes.items():
        row = {"node": name, "tokens": tokens}
        outs = {}
        for variant, fn in (("eager", eager), ("ours", ours)):
            xi = x.detach().requires_grad_()
            y = fn(xi)
            ys = y if isinstance(y, tuple) else (y,)
            cot = [torch.randn(t.shape, device=device, dtype=t.dtype, generator=gen.manual_seed(1)) for t in ys]
            torch.autograd.backward(ys, cot)
            outs[variant] = (ys, xi.grad)

            def step(fn=fn, cot=cot):
                xi = x.detach().requires_grad_()
                y = fn(xi)
                torch.autograd.backward(y if isinstance(y, tuple) else (y,), cot)

            row[f"{variant}_ms"], row[f"{variant}_peak_gib"] = timed(step, args.repeats, device)
            row[f"{variant}_ms"] *= 1e3
        (ye, dxe), (yo, dxo) = outs["eager"], outs["ours"]
        row["out_rel_diff"] = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(yo, ye))
        row["dx_rel_diff"] = ((dxo.float() - dxe.float()).norm() / dxe.float().norm()).item()
        row["speedup"] = row["eager_ms"] / row["ours_ms"]
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"nodes": results, "lowrank": checks}, indent=1))
    print(f"{'op':<5} {'M':>6} {'K':>6} {'err ours':>9} {'err eager':>9} {'ours us':>8} {'eager us':>8}")
    for c in checks:
        print(
            f"{c['op']:<5} {c['m']:>6} {c['k']:>6} {c['err_ours']:>9.2e} {c['err_eager']:>9.2e} "
            f"{c['ours_us']:>8.1f} {c['eager_us']:>8.1f}"
        )
    print(
        f"{'node':<9} {'tokens':>6} {'eager ms':>9} {'ours ms':>8} {'speedup':>8} {'eager GiB':>9} {'ours GiB':>9} {'d out':>8} {'d dx':>8}"
    )
    for r in results:
        print(
            f"{r['node']:<9} {r['tokens']:>6} {r['eager_ms']:>9.3f} {r['ours_ms']:>8.3f} {r['speedup']:>8.2f} "
            f"{r['eager_peak_gib']:>9.3f} {r['ours_peak_gib']:>9.3f} {r['out_rel_diff']:>8.1e} {r['dx_rel_diff']:>8.1e}"
        )


if __name__ == "__main__":
    main()
