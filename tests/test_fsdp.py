"""Fully sharded data parallel (FSDP2's fully_shard per decoder layer and at the root, gloo, 2
processes on CPU): FSDP's hooks split the captured forward at every layer, and each layer's
graph still gets graft's fused nodes; the model trains like its sharded, unoptimized twin."""

from data_parallel import assert_trains_like_the_twin


def test_fsdp_trains_like_the_unoptimized_twin(tmp_path):
    assert_trains_like_the_twin(tmp_path, "fsdp")
