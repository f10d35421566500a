"""causal_attention: SDPA over a mask built from shapes alone runs with is_causal=True."""

import functools

import pytest
import torch
import torch.nn.functional as F
import transformers.masking_utils as masking
from models import LAYERS, VOCAB, batch, tiny_causal_lm, train_losses

from patterns import attention
from patterns.attention import causal_attention, is_causal_mask
from rewriter import optimize, report


@pytest.fixture
def hf_keeps_the_mask(monkeypatch):
    """What transformers 5.17 with torch 2.11 does under Dynamo (the GPU machine): never skip
    the causal mask, so the captured graph builds one and SDPA takes its masked path."""
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", lambda *args, **kwargs: False)


def test_the_mask_check_accepts_only_the_causal_triangle():
    tri = torch.ones(5, 5, dtype=torch.bool).tril()
    assert is_causal_mask(tri[None, None], 5, 5)
    additive = torch.zeros(5, 5).masked_fill(~tri, float("-inf"))
    assert is_causal_mask(additive[None, None].expand(2, 1, 5, 5), 5, 5)
    assert is_causal_mask(torch.zeros(5, 5).masked_fill(~tri, torch.finfo(torch.float32).min), 5, 5)
    window = tri & ~torch.ones(5, 5, dtype=torch.bool).tril(-3)  # a sliding window that bites
    assert not is_causal_mask(window, 5, 5)
    assert not is_causal_mask(torch.zeros(5, 5).masked_fill(~tri, -1.0), 5, 5)  # a soft bias
    assert not is_causal_mask(tri[:4], 4, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_equals_sdpa_with_the_mask_and_falls_back_on_others(dtype):
    q, k, v = (torch.randn(2, 4, 7, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    tri = torch.ones(7, 7, dtype=torch.bool).tril()
    window = tri & ~torch.ones(7, 7, dtype=torch.bool).tril(-2)
    for mask in (tri[None, None], window[None, None]):
        ours = causal_attention(q, k, v, mask, dropout_p=0.0, scale=None, enable_gqa=False)
        eager = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(ours, eager)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_a_materialised_causal_mask_becomes_is_causal_and_trains_like_the_twin(model_type, hf_keeps_the_mask):
    twin = tiny_causal_lm(model_type)
    model = optimize(tiny_causal_lm(model_type))
    rep = report(model)
    assert rep.counts()["causal_attention"] == LAYERS and rep.verified, str(rep)
    la, lb = train_losses(twin), train_losses(model)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(la, lb)), (la, lb)


def test_a_padding_mask_keeps_the_masked_attention_and_an_all_ones_one_becomes_causal(hf_keeps_the_mask, monkeypatch):
    """A mask that reads the attention_mask input is checked at run time, once per mask tensor
    (the layers share it): with padding SDPA keeps the mask, with nothing padded it runs
    is_causal=True; both train like the twin."""
    verdicts = []

    def recording(mask, q_len, kv_len):
        verdicts.append(is_causal_mask(mask, q_len, kv_len))
        return verdicts[-1]

    monkeypatch.setattr(attention, "is_causal_mask", recording)  # our node's, not traced by Dynamo
    for padded in (True, False):
        twin = tiny_causal_lm("llama")
        model = optimize(tiny_causal_lm("llama"), sample=_masked_batch(0, padded))
        rep = report(model)
        assert rep.counts()["causal_attention"] == LAYERS and rep.verified, str(rep)
        verdicts.clear()
        model.train()
        model(**_masked_batch(1, padded)).loss.backward()
        model.zero_grad(set_to_none=True)
        assert verdicts == [not padded]  # one check for all layers
        la, lb = (train_losses(m, batches=functools.partial(_masked_batch, padded=padded)) for m in (twin, model))
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(la, lb)), (la, lb)


def _masked_batch(step: int, padded: bool) -> dict:
    return _with_mask(batch(step), padded)


def _with_mask(b: dict, padded: bool) -> dict:
    mask = torch.ones_like(b["input_ids"])
    if padded:
        mask[0, :3] = 0  # left padding
    return dict(b, attention_mask=mask)


def test_without_a_mask_nothing_changes():
    model = optimize(tiny_causal_lm("llama"), patterns=["causal_attention"])
    assert report(model).counts().get("causal_attention", 0) == 0
    assert VOCAB > 0


def test_a_sliding_window_that_bites_keeps_the_mask(hf_keeps_the_mask):
    """Mistral with a window shorter than the sequence: the mask is not the causal triangle, so
    the run-time check keeps the masked SDPA, and the model trains like its twin."""
    config = dict(sliding_window=6)
    twin = tiny_causal_lm("mistral", config=config)
    model = optimize(tiny_causal_lm("mistral", config=config), sample=batch(0, length=19))
    rep = report(model)
    assert rep.counts()["causal_attention"] == LAYERS and rep.verified, str(rep)  # in place, keeping the mask
    la, lb = train_losses(twin), train_losses(model)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(la, lb)), (la, lb)
