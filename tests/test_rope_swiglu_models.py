"""The rope and swiglu patterns on tiny real Llama / Mistral models with LoRA: every attention
block and every MLP covered, verified, and training like the unoptimized twin."""

import pytest
import torch
from models import LAYERS, tiny_causal_lm, tiny_config, train_losses
from peft import LoraConfig, get_peft_model
from test_optimize import STEP_LOSS_BOUND
from transformers import LlamaForCausalLM

from rewriter import optimize, report

# These patterns alone: the architectures' lists put LoRA patterns first, and the LoRA MLP
# pattern takes the whole MLP (silu * up included) where every projection has LoRA.
PATTERNS = ["rmsnorm", "rope", "swiglu"]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_attention_and_mlp_is_covered_verified_and_trains_like_the_twin(model_type, dtype):
    twin = tiny_causal_lm(model_type, dtype=dtype)
    model = optimize(tiny_causal_lm(model_type, dtype=dtype), patterns=PATTERNS)
    rep = report(model)
    assert rep.counts()["rope"] == LAYERS
    assert rep.counts()["swiglu"] == LAYERS
    assert rep.verified, str(rep)
    assert not rep.fallbacks, str(rep)
    modules = {(m.pattern, m.module) for m in rep.matches if m.status == "applied"}
    for i in range(LAYERS):
        assert ("rope", f"model.layers.{i}.self_attn") in modules
        assert ("swiglu", f"model.layers.{i}.mlp") in modules
    for m in rep.matches:  # each rope match is both outputs: one kernel launch for q and k
        if m.pattern == "rope":
            assert len(m.nodes) == 16 and {c["what"] for c in m.comparisons} >= {"output 0", "output 1"}
            # in place: q and k (views of the LoRA projections' sums) have no other reader
            assert m.replacement == "replace_rope_in_place", m
    # swiglu keeps no silu(gate) for backward: eager's saved activations shrink
    saved = {m.pattern: (m.saved_bytes_eager, m.saved_bytes_ours) for m in rep.matches}
    assert saved["swiglu"][1] < saved["swiglu"][0]
    losses, twin_losses = train_losses(model), train_losses(twin)
    for step, (ours, theirs) in enumerate(zip(losses, twin_losses)):
        assert abs(ours - theirs) <= STEP_LOSS_BOUND[dtype] * abs(theirs), f"step {step}: {ours} vs {theirs}"
    assert not report(model).fallbacks  # the later, dynamic-shape graph matched as well


def gelu_llama():
    config = tiny_config("llama")
    config.hidden_act = "gelu"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, lora)


def test_a_gelu_mlp_is_not_taken_for_swiglu_and_the_report_says_why():
    model = optimize(gelu_llama(), patterns=PATTERNS)
    rep = report(model)
    assert rep.counts()["swiglu"] == 0
    assert rep.counts()["rope"] == LAYERS
    refused = {f.module: f.reason for f in rep.fallbacks if f.pattern == "swiglu"}
    assert set(refused) == {f"model.layers.{i}.mlp" for i in range(LAYERS)}
    assert all("gelu" in why and "silu" in why for why in refused.values()), refused
    assert rep.verified


def test_unsupported_dtype_is_refused_per_module_with_the_reason():
    model = optimize(tiny_causal_lm("llama", dtype=torch.float64), patterns=PATTERNS)
    rep = report(model)
    assert rep.counts()["rope"] == 0 and rep.counts()["swiglu"] == 0
    for pattern, module in [("rope", "self_attn"), ("swiglu", "mlp")]:
        reasons = [f.reason for f in rep.fallbacks if f.pattern == pattern]
        assert len(reasons) == LAYERS and all("unsupported dtypes torch.float64" in r for r in reasons)
        assert {f.module for f in rep.fallbacks if f.pattern == pattern} == {
            f"model.layers.{i}.{module}" for i in range(LAYERS)
        }
