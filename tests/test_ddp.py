"""Data-parallel training (DistributedDataParallel over gloo, 2 processes on CPU): an optimized
model trains like its unoptimized twin, with small gradient buckets (Dynamo's DDP graph
splitting is off for graft's capture)."""

from data_parallel import assert_trains_like_the_twin


def test_ddp_trains_like_the_unoptimized_twin(tmp_path):
    assert_trains_like_the_twin(tmp_path, "ddp")


def test_ddp_over_4bit_weights_fuses_every_lora_layer_and_trains_like_the_twin(tmp_path):
    """QLoRA under DDP: each rank holds whole bitsandbytes 4-bit weights, so every decoder
    layer gets the fused 4-bit LoRA nodes."""
    assert_trains_like_the_twin(tmp_path, "ddp", four_bit=True)
