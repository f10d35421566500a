"""Fully sharded data parallel (FSDP2's fully_shard per decoder layer and at the root, gloo, 2
processes on CPU): FSDP's hooks split the captured forward at every layer, and each layer's
graph still gets graft's fused nodes; the model trains like its sharded, unoptimized twin."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import _free_port

TESTS = Path(__file__).resolve().parent


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


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
    return t.to_local() if hasattr(t, "to_local") else t


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from models import tiny_causal_lm

        from rewriter import optimize, report

        twin = _shard(tiny_causal_lm("llama"))
        model = optimize(_shard(tiny_causal_lm("llama")))
        rep = report(model)
        result = {
            "twin": _train(twin, rank),
            "ours": _train(model, rank),
            "counts": rep.counts(),
            "verified": rep.verified,
            "fallbacks": [f.reason for f in rep.fallbacks],
            "max_param_diff": max(
                (_local(a) - _local(b)).abs().max().item()
                for a, b in zip(twin.parameters(), model.parameters())
                if a.requires_grad
            ),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_fsdp_trains_like_the_unoptimized_twin(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["verified"] and not r["fallbacks"], r
        assert r["counts"]["rmsnorm_lora_qkv"] == r["counts"]["rmsnorm_lora_mlp"] == 2, r["counts"]
        for a, b in zip(r["twin"], r["ours"]):
            assert abs(a - b) <= 1e-5 * abs(a), (r["twin"], r["ours"])
        assert r["max_param_diff"] < 1e-5
