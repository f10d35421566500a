"""The linear_cross_entropy pattern on tiny real Llama / Mistral models (LoRA and full fine-tune)."""

import pytest
import torch
from models import batch, tiny_causal_lm, train_losses
from test_optimize import STEP_LOSS_BOUND

from patterns.loss import LINEAR_CROSS_ENTROPY
from rewriter import optimize, report

ONLY_LOSS = ["linear_cross_entropy"]


def assert_same_training(a, b, dtype):
    la, lb = train_losses(a), train_losses(b)
    for step, (x, y) in enumerate(zip(la, lb)):
        assert abs(x - y) <= STEP_LOSS_BOUND[dtype] * abs(x), f"step {step}: {x} vs {y}"


def loss_record(model):
    (rec,) = [m for m in report(model).matches if m.pattern == "linear_cross_entropy"]
    return rec


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_model_fuses_the_loss_verified_and_trains_like_the_twin(model_type, dtype):
    twin = tiny_causal_lm(model_type, dtype=dtype)
    model = tiny_causal_lm(model_type, dtype=dtype)
    optimize(model, patterns=ONLY_LOSS)
    rep = report(model)
    assert rep.counts()["linear_cross_entropy"] == 1
    assert rep.verified, str(rep)
    assert not rep.fallbacks, str(rep)
    rec = loss_record(model)
    whats = [c["what"] for c in rec.comparisons]  # the loss and the hidden states' gradient (lm_head frozen)
    assert len(whats) == 2 and whats[0] == "output 0" and whats[1].startswith("grad hidden_states"), whats
    assert rec.dropped == ["logits"]  # returned as None in training with labels
    assert rec.saved_bytes_ours < rec.saved_bytes_eager  # no fp32 log-softmax kept for backward
    assert_same_training(twin, model, dtype)  # lengths 13..37: the dynamic-shape graph too
    assert report(model).counts()["linear_cross_entropy"] == 1 and not report(model).fallbacks
    out = model(**batch(9, length=41))
    assert out.logits is None and report(model).graphs == 2  # the fused loss runs in the dynamic graph


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_the_architecture_pattern_lists_include_the_fused_loss(model_type):
    model = optimize(tiny_causal_lm(model_type))
    rep = report(model)
    assert rep.counts()["linear_cross_entropy"] == 1
    assert not [f for f in rep.fallbacks if f.pattern == "linear_cross_entropy"]


def test_trainable_lm_head_gets_the_same_gradient():
    twin = tiny_causal_lm("llama", lora=False)
    model = optimize(tiny_causal_lm("llama", lora=False), patterns=ONLY_LOSS)
    rep = report(model)
    assert rep.counts()["linear_cross_entropy"] == 1 and rep.verified, str(rep)
    whats = [c["what"] for c in loss_record(model).comparisons]
    assert len(whats) == 3 and any("lm_head" in w for w in whats), whats  # the weight's gradient was verified too
    for seed in (11, 12):  # the sample's shape (2 x 16): the static graph, no recompilation
        for m in (twin, model):
            m.train()
            m.zero_grad(set_to_none=True)
            m(**batch(seed, length=16)).loss.backward()
        for name in ("lm_head.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"):
            a, b = twin.get_parameter(name).grad, model.get_parameter(name).grad
            assert b is not None and b.abs().sum() > 0, name
            assert ((a - b).norm() / a.norm()).item() < 1e-5, name


@pytest.mark.parametrize("num_items", [37, "tensor"])
def test_num_items_in_batch_as_hf_trainer_passes_it(num_items):
    """HF Trainer (gradient accumulation) passes num_items_in_batch: reduction "sum", then / N."""
    twin = tiny_causal_lm("llama")
    model = tiny_causal_lm("llama")
    n = torch.tensor(37) if num_items == "tensor" else num_items
    optimize(model, patterns=ONLY_LOSS, sample={**batch(0), "num_items_in_batch": n})
    rep = report(model)
    assert rep.counts()["linear_cross_entropy"] == 1 and rep.verified, str(rep)
    for seed in (5, 6):
        data = {**batch(seed, length=16), "num_items_in_batch": n}
        losses = []
        for m in (twin, model):
            m.train()
            m.zero_grad(set_to_none=True)
            out = m(**data)
            out.loss.backward()
            losses.append(out.loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for (name, a), b in zip(twin.named_parameters(), model.parameters()):
            if a.grad is not None:
                assert ((a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-12)).item() < 1e-4, name


def test_logits_are_unchanged_without_labels_and_dropped_with_them():
    twin = tiny_causal_lm("llama")
    model = optimize(tiny_causal_lm("llama"), patterns=ONLY_LOSS)
    data = batch(3)
    for mode in ("train", "eval"):
        getattr(twin, mode)()
        getattr(model, mode)()
        a, b = twin(input_ids=data["input_ids"]), model(input_ids=data["input_ids"])
        assert b.loss is None and b.logits.shape == a.logits.shape
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    model.eval()  # eval with labels runs the original forward: logits and loss as HF gives them
    out = model(**data)
    assert out.logits is not None and out.loss.item() == pytest.approx(twin(**data).loss.item(), rel=1e-6)
    model.train()
    out = model(**data)
    assert out.logits is None and out.loss.item() == pytest.approx(twin.train()(**data).loss.item(), rel=1e-5)


def test_autocast_is_refused_with_the_reason():
    model = tiny_causal_lm("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimize(model, patterns=ONLY_LOSS)
    rep = report(model)
    assert rep.counts()["linear_cross_entropy"] == 0
    assert any("autocast" in f.reason for f in rep.fallbacks if f.pattern == "linear_cross_entropy"), str(rep)


def test_pattern_wildcards():
    from rewriter.match import Wildcard

    nodes = list(LINEAR_CROSS_ENTROPY.graph.graph.nodes)
    names = {a.name for n in nodes for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, Wildcard)}
    assert names == {"reduction", "V", "device"}
