"""Fully sharded data parallel (gloo, 2 processes on CPU). FSDP2's fully_shard per decoder layer
and at the root: FSDP's hooks split the captured forward at every layer, and each layer's graph
still gets graft's fused nodes; the model trains like its sharded, unoptimized twin. FSDP1 per
decoder layer: a flat parameter that mixes LoRA and frozen weights makes the frozen ones
require grad in the graph; the fused LoRA nodes (no base-weight gradient) fail verification
there, are reverted with that reason, and the model still trains like its twin. FSDP2 over
bitsandbytes 4-bit weights: the LoRA layers are left to bitsandbytes with that reason (the
shards do not carry the quant_state), the rest is fused, and the model trains like its twin."""

from data_parallel import assert_trains_like_the_twin


def test_fsdp_trains_like_the_unoptimized_twin(tmp_path):
    assert_trains_like_the_twin(tmp_path, "fsdp")


def test_fsdp1_with_mixed_flat_parameters_reverts_the_lora_nodes_with_the_reason_and_trains_alike(tmp_path):
    r = assert_trains_like_the_twin(tmp_path, "fsdp1", lora_fused=False)
    assert r["counts"]["rope"] == 2 and r["counts"]["linear_cross_entropy"] == 1, r["counts"]
    assert {"rmsnorm_lora_qkv", "rmsnorm_lora_mlp"} <= set(r["reverted"]), r["reverted"]
    assert all("base_layer_weight" in why for why in r["reverted"].values()), r["reverted"]


def test_fsdp_over_4bit_weights_leaves_the_lora_layers_to_bitsandbytes_with_the_reason_and_trains_alike(tmp_path):
    r = assert_trains_like_the_twin(tmp_path, "fsdp", lora_fused=False, four_bit=True)
    assert not r["reverted"], r["reverted"]  # refused before verification, not caught by it
    lora_nodes = ("rmsnorm_lora_qkv", "rmsnorm_lora_mlp", "lora_qkv", "lora_mlp", "lora_o", "lora_linear")
    assert all(r["counts"][name] == 0 for name in lora_nodes), r["counts"]
    assert any("sharded by FSDP" in why for why in r["fallbacks"]), r["fallbacks"]
    assert r["counts"]["rmsnorm"] == 5 and r["counts"]["linear_cross_entropy"] == 1, r["counts"]
