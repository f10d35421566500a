"""End-to-end QLoRA training benchmark: Llama-3.1-8B / Mistral-7B shapes, NF4, LoRA r=16.

The "8B QLoRA" workload of ../shared/reference.md section 1: random weights (seed 0) quantized
to NF4 with double quantization and bf16 compute, PEFT LoRA r=16, alpha=16, dropout 0 on
q,k,v,o,gate,up,down, AdamW lr 1e-4, random token batches (ids 3..vocab-1, labels = ids).
Median step time over steps 3..8; peak = torch.cuda.max_memory_allocated over the steps (graft's
optimize(), which verifies against the original model, is reported apart as optimize_peak_gib); host
ms = the median time for the host to issue a step (forward, backward, optimizer) before it waits
for the loss: near the step time when the host, not the GPU, is the limit. replay (graft with CUDA
graphs) = the captured forward and backward replayed back to back: the step's GPU time with the
gaps between its kernels, so step ms less replay is what the host exposes after each loss sync.
Each variant runs in its own process (a driver spawns workers), so peaks do not mix.

    python benchmarks/bench_e2e.py --shape llama8b --seq 2048 --batch 2 \
        --variants hf,graft --checkpointing both --out e2e.json
    python benchmarks/bench_e2e.py --smoke          # tiny shape on CPU, checks the plumbing

Weights are generated on the device layer by layer and quantized there (no 16 GB checkpoint on
disk): the same model bnb would load, built in seconds. use_cache=False in every variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=131072,
    ),
    "mistral7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rope_theta=1e6,
        rms_norm_eps=1e-5, max_position_embeddings=32768, sliding_window=None,
    ),
    "tiny": dict(
        model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512, rope_theta=500000.0,
        rms_norm_eps=1e-5, max_position_embeddings=4096,
    ),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 790.0  # dense bf16 matmul measured on the H200 (reference.md)


def flops_per_token(shape: dict, checkpointing: bool) -> float:
    """Forward + dX backward (frozen base, no dW), + one more forward when recomputing."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * (h * h + 2 * h * kv + h * h + 3 * h * i)
    forward = n * per_layer + 2 * h * shape["vocab_size"]
    return forward * (3 if checkpointing else 2)


def build_model(shape: dict, device: str, seed: int = 0):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**shape, tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    weight = torch.empty(child.out_features, child.in_features, device=device, dtype=torch.bfloat16)
                    weight.normal_(0.0, config.initializer_range, generator=gen)
                    q = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                        compress_statistics=True, quant_type="nf4", device="meta",
                    )  # fmt: skip
                    q.weight = bnb.nn.Params4bit(
                        weight, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
                    ).to(device)
                    setattr(parent, name, q)
    for module_name, module in model.named_modules():  # the rest: embeddings, norms, lm_head
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                data = torch.empty(p.shape, dtype=p.dtype, device=device)
                if "norm" in f"{module_name}.{name}":
                    data.fill_(1.0)
                else:
                    data.normal_(0.0, config.initializer_range, generator=gen)
                module._parameters[name] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
    with torch.device(device):  # the meta model's inv_freq buffer holds no values
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets
    return model


def batches(shape: dict, seq: int, batch: int, steps: int, device: str):
    import torch

    gen = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        ids = torch.randint(3, shape["vocab_size"], (batch, seq), generator=gen).to(device)
        yield {"input_ids": ids, "labels": ids.clone(), "use_cache": False}


def worker(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    shape, variant, ckpt = SHAPES[spec["shape"]], spec["variant"], spec["checkpointing"]
    if spec.get("layers"):
        shape = dict(shape, num_hidden_layers=spec["layers"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = dict(spec)
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_mistral

        patch = apply_liger_kernel_to_llama if shape["model_type"] == "llama" else apply_liger_kernel_to_mistral
        patch()
    t0 = time.perf_counter()
    model = build_model(shape, device)
    if variant == "hf_kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if ckpt and variant != "hf_kbit":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = list(batches(shape, spec["seq"], spec["batch"], spec["steps"], device))
    result["build_s"] = time.perf_counter() - t0
    if variant.startswith("graft"):
        from rewriter import optimize, report

        t0 = time.perf_counter()
        sample = data[0]
        if spec.get("verify_tokens") and spec["seq"] > spec["verify_tokens"]:
            # verify on a prefix (16k tokens of float64 checks take minutes); training at the
            # full length then compiles once more and reuses the verified decisions
            sample = {k: v[:1, : spec["verify_tokens"]] if torch.is_tensor(v) else v for k, v in sample.items()}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        optimize(model, sample=sample, cuda_graphs=variant != "graft_eager")
        result["optimize_s"] = time.perf_counter() - t0
        if device == "cuda":  # capture and verification, before training (not in peak_gib)
            result["optimize_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rep = report(model)
        result["counts"] = rep.counts()
        result["verified"] = rep.verified
        result["report"] = str(rep)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses, times, hosts = [], [], []
    for step, batch in enumerate(data):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        hosts.append(time.perf_counter() - t0)  # the host's part: near the step time when host-bound
        losses.append(loss.item())  # syncs
        times.append(time.perf_counter() - t0)
        print(f"  step {step} loss {losses[-1]:.4f} {times[-1]:.3f}s", file=sys.stderr, flush=True)
    if spec.get("profile") and device == "cuda":
        result["profile"] = profile_step(
            model, opt, data[-1], spec["profile"], f"{variant}_{'ckpt' if ckpt else 'nockpt'}"
        )
    if variant == "graft" and device == "cuda":
        result["replay_ms"] = replay_only(model)
    if variant.startswith("graft"):
        rep = report(model)
        result["report"] = str(rep)
        result["fallbacks"] = [f.reason for f in rep.fallbacks]
        result["cuda_graphs"] = rep.cuda_graphs
    tokens = spec["seq"] * spec["batch"]
    steady = times[3:] if len(times) > 3 else times
    result.update(
        losses=losses,
        step_s=statistics.median(steady),
        host_s=statistics.median(hosts[3:] if len(hosts) > 3 else hosts),
        first_step_s=times[0],
        tokens_per_s=tokens / statistics.median(steady),
        peak_gib=(torch.cuda.max_memory_allocated() / 2**30) if device == "cuda" else float("nan"),
        # what the allocator held (cached blocks and a CUDA graph's private pool included)
        reserved_gib=(torch.cuda.max_memory_reserved() / 2**30) if device == "cuda" else float("nan"),
    )
    result["mfu"] = result["tokens_per_s"] * flops_per_token(shape, ckpt) / (PEAK_TFLOPS * 1e12)
    return result


def replay_only(model, repeats: int = 5) -> float | None:
    """The median time of the captured forward and backward graphs replayed back to back, with
    no host work between them: the step's GPU time including the gaps between its kernels.
    The step time less this is what the host exposes (its work after each step's loss sync)."""
    import importlib

    import torch

    sessions = importlib.import_module("rewriter.optimize")._SESSIONS
    captures = [g.replayer.capture for s in sessions.values() for g in s.graphs if g.replayer and g.replayer.capture]
    if len(captures) != 1:
        return None
    capture, times = captures[0], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        capture.forward_graph.replay()
        capture.backward_graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    capture.pending = False
    return statistics.median(times)


def profile_step(model, opt, batch: dict, folder: str, name: str) -> dict:
    """One more step under torch.profiler (after the timed ones): the kernel table by GPU time,
    the operator table by host time, and how busy the GPU was over the step's wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.self_device_time_total for e in kernels)
    text = (
        f"wall {wall * 1e3:.1f} ms, GPU kernels {busy_us / 1e3:.1f} ms\n\n"
        + events.table(sort_by="self_device_time_total", row_limit=50, max_name_column_width=90)
        + "\n\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90)
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"profile_{name}.txt").write_text(text)
    return {"wall_ms": wall * 1e3, "kernel_ms": busy_us / 1e3, "table": text}


def run_variant(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        return dict(
            spec, error=f"timed out after {timeout:.0f}s", log=(exc.stderr or b"")[-3000:].decode(errors="replace")
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(spec, error=f"exit {proc.returncode}", log=proc.stderr[-4000:])
    result = json.loads(lines[-1])
    result["log"] = proc.stderr[-2000:]
    return result


def table(results: list[dict]) -> str:
    rows = [
        f"{'shape':<10} {'seq x b':>9} {'variant':<11} {'ckpt':<4} {'tok/s':>8} {'ratio':>6} {'peak GiB':>8} "
        f"{'MFU':>5} {'host ms':>7} {'step ms':>7} {'replay':>6} {'loss0':>8} {'dloss max':>9}"
    ]
    for r in results:
        key = (r["shape"], r["seq"], r["batch"], r["checkpointing"])
        base = next(
            (b for b in results if b["variant"] == "hf" and (b["shape"], b["seq"], b["batch"], b["checkpointing"]) == key and "error" not in b),
            None,
        )  # fmt: skip
        head = f"{r['shape']:<10} {r['seq']:>5}x{r['batch']:<3} {r['variant']:<11} {'yes' if r['checkpointing'] else 'no':<4}"
        if "error" in r:
            rows.append(f"{head} ERROR {r['error']}")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
        dloss = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])) if base else math.nan
        rows.append(
            f"{head} {r['tokens_per_s']:>8.0f} {ratio:>6.2f} {r['peak_gib']:>8.2f} {r['mfu']:>5.2f} "
            f"{r.get('host_s', math.nan) * 1e3:>7.0f} {r['step_s'] * 1e3:>7.1f} {r.get('replay_ms') or math.nan:>6.1f} "
            f"{r['losses'][0]:>8.4f} {dloss:>9.1e}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument(
        "--layers", type=int, help="fewer decoder layers (with a short --seq: the host's cost per layer, GPU idle)"
    )
    parser.add_argument(
        "--variants", default="hf,graft", help="comma list of hf, hf_kbit, liger, graft, graft_eager (no CUDA graphs)"
    )
    parser.add_argument("--checkpointing", default="both", choices=["yes", "no", "both"])
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per variant")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 4 steps")
    parser.add_argument("--verify-tokens", type=int, help="graft: verify on a prefix of this many tokens")
    parser.add_argument("--profile", help="after timing, profile one more step; tables go in this folder")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.smoke:
        args.shape, args.seq, args.batch, args.steps = "tiny", 64, 2, 4
    modes = {"yes": [True], "no": [False], "both": [True, False]}[args.checkpointing]
    results = []
    for ckpt in modes:
        for variant in args.variants.split(","):
            spec = dict(
                shape=args.shape, seq=args.seq, batch=args.batch, steps=args.steps, variant=variant, checkpointing=ckpt
            )
            if args.profile:
                spec["profile"] = args.profile
            if args.verify_tokens:
                spec["verify_tokens"] = args.verify_tokens
            if args.layers:
                spec["layers"] = args.layers
            t0 = time.perf_counter()
            results.append(run_variant(spec, args.timeout))
            print(
                f"{variant} ckpt={ckpt}: {time.perf_counter() - t0:.0f}s {results[-1].get('error', '')}",
                file=sys.stderr,
                flush=True,
            )
            if "report" in results[-1]:
                print(results[-1]["report"], file=sys.stderr)
            if "error" in results[-1]:
                print(results[-1]["log"], file=sys.stderr)
            if args.out:  # after every variant: a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=1))
            print(table(results), file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
