"""LoRA patterns on whole tiny models: 4-bit (bitsandbytes on CPU) and dense, PEFT-wrapped."""

import pytest
import torch
from models import LAYERS, tiny_4bit_causal_lm, tiny_causal_lm, train_losses
from test_optimize import assert_same_training

from patterns.lora import lora_problem
from rewriter import optimize, report

LORA = ("rmsnorm_lora_mlp", "rmsnorm_lora_qkv", "lora_mlp", "lora_qkv", "lora_o", "lora_linear")


def lora_layer_count(model):
    from peft.tuners.lora.layer import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def assert_every_lora_layer_fused(rep, model):
    counts = rep.counts()
    # q/k/v and the MLP are fused with the RMSNorm that feeds them
    assert counts["rmsnorm_lora_mlp"] == LAYERS and counts["rmsnorm_lora_qkv"] == LAYERS and counts["lora_o"] == LAYERS
    assert counts["lora_linear"] == counts["lora_mlp"] == counts["lora_qkv"] == 0
    assert 3 * LAYERS + 3 * LAYERS + LAYERS == lora_layer_count(model)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_4bit_model_every_projection_fused_verified_and_trains_like_the_twin(model_type, tmp_path):
    twin = tiny_4bit_causal_lm(model_type, tmp_path)
    model = optimize(tiny_4bit_causal_lm(model_type, tmp_path))
    rep = report(model)
    assert_every_lora_layer_fused(rep, model)
    assert rep.verified, str(rep)
    assert not rep.fallbacks, str(rep)
    assert_same_training(twin, model, torch.bfloat16)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_bf16_lora_twin_fused_and_trains_alike(model_type):
    twin = tiny_causal_lm(model_type, dtype=torch.bfloat16)
    model = optimize(tiny_causal_lm(model_type, dtype=torch.bfloat16))
    rep = report(model)
    assert_every_lora_layer_fused(rep, model)
    assert rep.verified, str(rep)
    assert_same_training(twin, model, torch.bfloat16)


@pytest.mark.parametrize(
    "options",
    [
        dict(lora_dropout=0.1),
        dict(use_rslora=True, r=16),
        dict(config=dict(attention_bias=True, mlp_bias=True)),
        dict(quant_type="fp4", double_quant=False),
    ],
    ids=["dropout", "rslora", "bias", "fp4-no-double-quant"],
)
def test_peer_fallback_cases_are_handled_not_fallen_back(options, tmp_path):
    twin = tiny_4bit_causal_lm("llama", tmp_path, **options)
    model = optimize(tiny_4bit_causal_lm("llama", tmp_path, **options))
    rep = report(model)
    assert_every_lora_layer_fused(rep, model)
    assert rep.verified and not rep.fallbacks, str(rep)
    assert_same_training(twin, model, torch.bfloat16)


def test_partial_targets_use_the_single_projection_node():
    twin = tiny_causal_lm("llama", target_modules=["q_proj", "v_proj", "up_proj"])
    model = optimize(tiny_causal_lm("llama", target_modules=["q_proj", "v_proj", "up_proj"]))
    rep = report(model)
    assert rep.counts()["lora_linear"] == 3 * LAYERS
    assert all(rep.counts()[name] == 0 for name in LORA if name != "lora_linear")
    assert rep.verified, str(rep)
    assert_same_training(twin, model, torch.float32)


def test_dora_falls_back_with_the_reason():
    model = optimize(tiny_causal_lm("llama", use_dora=True))
    rep = report(model)
    assert all(rep.counts()[name] == 0 for name in LORA)
    assert any("DoRA" in f.reason for f in rep.fallbacks), str(rep)
    assert rep.verified  # what runs (the original LoRA path, plus norms and rope) is verified
    train_losses(model, steps=1)


def test_several_active_adapters_fall_back_with_the_reason():
    model = tiny_causal_lm("llama")
    model.add_adapter("second", model.peft_config["default"])
    model.base_model.set_adapter(["default", "second"])
    optimize(model)
    rep = report(model)
    assert all(rep.counts()[name] == 0 for name in LORA)
    assert any("2 active adapters" in f.reason for f in rep.fallbacks), str(rep)


def test_merged_and_disabled_adapters_are_refused():
    model = tiny_causal_lm("llama")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_problem(layer) is None
    layer.merge()
    assert "merged" in lora_problem(layer)
    layer.unmerge()
    with model.disable_adapter():
        assert "disabled" in lora_problem(layer)
