"""Two gloo processes on CPU train an optimized model and its unoptimized twin alike, each rank
on its own batches; the data-parallel tests differ only in how a model is wrapped:

    "ddp"   optimize, then DistributedDataParallel with tiny gradient buckets (many of them)
    "fsdp"  FSDP2's fully_shard per decoder layer and at the root, then optimize
    "fsdp1" FSDP1 (FullyShardedDataParallel, use_orig_params) per decoder layer, then optimize

The model is the tiny fp32 Llama with LoRA, or with four_bit its bitsandbytes 4-bit (bf16) twin.
"""

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(model, wrap: str, optimized: bool):
    from rewriter import optimize

    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(optimize(model) if optimized else model, bucket_cap_mb=0.001)
    if wrap == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        model = FullyShardedDataParallel(
            model,
            auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )
        return optimize(model) if optimized else model
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    model = fully_shard(model)
    return optimize(model) if optimized else model


def _train(model, rank: int, steps: int = 3) -> list[float]:
    from models import batch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        loss = model(**batch(step + 100 * rank)).loss  # each rank its own data
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 shard


def _model(folder: str, four_bit: bool):
    from models import tiny_4bit_causal_lm, tiny_causal_lm

    return tiny_4bit_causal_lm("llama", Path(folder)) if four_bit else tiny_causal_lm("llama")


def _worker(rank: int, world: int, port: int, out: str, wrap: str, four_bit: bool) -> None:
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from rewriter import report

        twin = _prepare(_model(out, four_bit), wrap, optimized=False)
        model = _prepare(_model(out, four_bit), wrap, optimized=True)
        rep = report(model.module if wrap == "ddp" else model)
        result = {
            "twin": _train(twin, rank),
            "ours": _train(model, rank),
            "counts": rep.counts(),
            "verified": rep.verified,
            "fallbacks": [f.reason for f in rep.fallbacks],
            "reverted": {m.pattern: m.reason for m in rep.matches if m.status == "reverted"},
            "max_param_diff": max(
                (_local(a) - _local(b)).abs().max().item()
                for a, b in zip(twin.parameters(), model.parameters())
                if a.requires_grad and _local(a).numel() > 0  # (FSDP1: a rank may hold none of it)
            ),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def assert_trains_like_the_twin(tmp_path: Path, wrap: str, lora_fused: bool = True, four_bit: bool = False) -> dict:
    """lora_fused: every decoder layer gets the fused LoRA nodes (else whatever the report says);
    returns rank 0's results."""
    from test_optimize import STEP_LOSS_BOUND

    if four_bit:  # the bf16 checkpoint both ranks load, written once
        from models import tiny_4bit_causal_lm

        tiny_4bit_causal_lm("llama", tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), wrap, four_bit), nprocs=2)
    bound = STEP_LOSS_BOUND[torch.bfloat16 if four_bit else torch.float32]
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["verified"], r
        if lora_fused:
            assert not r["fallbacks"] and not r["reverted"], r
            assert r["counts"]["rmsnorm_lora_qkv"] == r["counts"]["rmsnorm_lora_mlp"] == 2, r["counts"]
        for a, b in zip(r["twin"], r["ours"]):
            assert abs(a - b) <= bound * abs(a), (r["twin"], r["ours"])
        assert r["max_param_diff"] < 1e-5, r["max_param_diff"]
    return json.loads((tmp_path / "rank0.json").read_text())
