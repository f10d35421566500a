"""Activation checkpointing (rewriter/checkpoint.py): HF's gradient checkpointing flag, honoured by
graft's own per-layer regions, trains like the unoptimized twin, and the recompute skips the
MLP's down GEMM without changing a single gradient bit."""

import pytest
import torch
from models import LAYERS, batch, tiny_4bit_causal_lm, tiny_causal_lm
from test_optimize import assert_same_training

import kernels.lora
from rewriter import optimize, report


def _checkpointed(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _grads(model, seed: int) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch(seed, length=23)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture
def mlp_forward_calls(monkeypatch):
    """need_output of every LoraMLPFunction forward (a spy on our own node, the kernels run)."""
    calls = []
    forward = kernels.lora.LoraMLPFunction.forward

    def spy(ctx, x, norm_weight, norm_eps, gate, up, down, need_output, *params):
        calls.append(need_output)
        return forward(ctx, x, norm_weight, norm_eps, gate, up, down, need_output, *params)

    monkeypatch.setattr(kernels.lora.LoraMLPFunction, "forward", staticmethod(spy))
    return calls


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_checkpointed_model_is_verified_and_trains_like_the_twin(model_type):
    twin = _checkpointed(tiny_causal_lm(model_type, dtype=torch.bfloat16))
    model = optimize(_checkpointed(tiny_causal_lm(model_type, dtype=torch.bfloat16)))
    rep = report(model)
    assert rep.checkpointing == f"graft's own, {LAYERS} layer(s)", str(rep)
    assert rep.verified and not rep.fallbacks, str(rep)
    assert rep.counts()["rmsnorm_lora_mlp"] == LAYERS
    assert_same_training(twin, model, torch.bfloat16)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "nf4"])
def test_recompute_skips_down_and_changes_no_gradient_bit(quantized, tmp_path, mlp_forward_calls):
    """bf16 runs the LoRA fold (kernels/fold.py), nf4 its 4-bit weights; the same model without
    checkpointing is the reference, bit for bit (CPU: every kernel is deterministic)."""

    def build():
        if quantized:
            return tiny_4bit_causal_lm("llama", tmp_path)
        return tiny_causal_lm("llama", dtype=torch.bfloat16)

    plain = optimize(build())
    model = optimize(_checkpointed(build()))
    for seed in (3, 4):
        expected = _grads(plain, seed)
        mlp_forward_calls.clear()
        got = _grads(model, seed)
        # forward: every layer's MLP with its output; recompute: every layer's MLP without it
        assert mlp_forward_calls == [True] * LAYERS + [False] * LAYERS
        assert got.keys() == expected.keys() and got
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


def test_recomputed_mlp_output_is_nan_and_its_saved_tensors_are_the_forwards():
    """need_output=False: the output is NaN (no plausible wrong answer if used) and backward
    through it gives the gradients of the full forward."""
    from patterns.lora import projection

    torch.manual_seed(0)
    mlp = tiny_causal_lm("llama", dtype=torch.bfloat16).base_model.model.model.layers[0].mlp
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    gate, up, down = (projection(m, x.dtype) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    params = [
        t
        for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for t in (m.lora_A["default"].weight, m.lora_B["default"].weight, None)
    ]
    grads = []
    for need_output in (True, False):
        xi = x.clone().requires_grad_()
        out = kernels.lora.lora_mlp(xi, gate, up, down, *params, need_output=need_output)
        assert out.isnan().all() != need_output
        dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
        trainable = [xi, *(t for t in params if t is not None)]
        grads.append(torch.autograd.grad(out, trainable, dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
