"""Data-parallel training (DistributedDataParallel over gloo, 2 processes on CPU): an optimized
model trains like its unoptimized twin, with small gradient buckets (Dynamo's DDP graph
splitting is off for graft's capture)."""

from data_parallel import assert_trains_like_the_twin


def test_ddp_trains_like_the_unoptimized_twin(tmp_path):
    assert_trains_like_the_twin(tmp_path, "ddp")
