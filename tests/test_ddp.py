"""Data-parallel training (DistributedDataParallel over gloo, 2 processes on CPU): an optimized
model trains like its unoptimized twin, with small gradient buckets (Dynamo's DDP graph
splitting is off for graft's capture)."""

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


def _train(model, rank: int, steps: int = 3) -> list[float]:
    from models import batch
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)  # many buckets
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        loss = ddp(**batch(step + 100 * rank)).loss  # each rank its own data
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from models import tiny_causal_lm

        from rewriter import optimize, report

        twin = tiny_causal_lm("llama")
        model = optimize(tiny_causal_lm("llama"))
        result = {
            "twin": _train(twin, rank),
            "ours": _train(model, rank),
            "counts": report(model).counts(),
            "verified": report(model).verified,
            "fallbacks": [f.reason for f in report(model).fallbacks],
            "max_param_diff": max(
                (a - b).abs().max().item() for a, b in zip(twin.parameters(), model.parameters()) if a.requires_grad
            ),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_trains_like_the_unoptimized_twin(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["verified"] and not r["fallbacks"], r
        assert r["counts"]["rmsnorm_lora_qkv"] == r["counts"]["rmsnorm_lora_mlp"] == 2, r["counts"]
        for a, b in zip(r["twin"], r["ours"]):
            assert abs(a - b) <= 1e-5 * abs(a), (r["twin"], r["ours"])
        assert r["max_param_diff"] < 1e-5
