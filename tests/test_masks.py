"""Attention masks are built eagerly, outside the captured graph (rewriter/capture.py): the graph
gets exactly the mask eager HF uses, none at all when nothing is padded."""

import functools

import pytest
import torch
import torch.nn.functional as F
from models import batch, tiny_causal_lm, train_losses

from rewriter import optimize, report
from rewriter.optimize import _SESSIONS


def _sdpa_masks(model) -> list:
    """The attn_mask argument of every SDPA call in the model's rewritten graphs."""
    masks = []
    hf = model.base_model.model if hasattr(model, "base_model") else model  # the causal LM under PEFT
    for graph in _SESSIONS[hf].graphs:
        for node in graph.current.graph.nodes:
            if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
                masks.append(node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None))
    return masks


def _close(la: list[float], lb: list[float]) -> bool:
    return all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(la, lb))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_without_padding_sdpa_gets_no_mask_and_trains_like_the_twin(model_type):
    twin = tiny_causal_lm(model_type)
    model = optimize(tiny_causal_lm(model_type))
    rep = report(model)
    masks = _sdpa_masks(model)
    assert rep.verified and masks and all(m is None for m in masks), (str(rep), masks)
    assert rep.masks.startswith("eager's"), rep.masks  # also for the process's later models
    assert _close(train_losses(twin), train_losses(model))


def _masked_batch(step: int, padded: bool) -> dict:
    b = batch(step)
    mask = torch.ones_like(b["input_ids"])
    if padded:
        mask[0, :3] = 0  # left padding
    return dict(b, attention_mask=mask)


@pytest.mark.parametrize("padded", [True, False])
def test_an_attention_mask_input_gives_eagers_mask_and_trains_like_the_twin(padded):
    twin = tiny_causal_lm("llama")
    model = optimize(tiny_causal_lm("llama"), sample=_masked_batch(0, padded))
    rep = report(model)
    masks = _sdpa_masks(model)
    assert rep.verified and masks, str(rep)
    assert all((m is not None) == padded for m in masks), masks  # all ones: eager skips it too
    batches = functools.partial(_masked_batch, padded=padded)
    assert _close(train_losses(twin, batches=batches), train_losses(model, batches=batches))


@pytest.mark.parametrize(
    "model_type, config, masked",
    [
        ("mistral", dict(sliding_window=6), {True}),
        # Qwen2: the window from layer max_window_layers on: the full layer needs no mask (eager
        # skips it too), the sliding one gets the window's
        ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1), {False, True}),
    ],
    ids=["mistral", "qwen2-mixed-layers"],
)
def test_a_sliding_window_that_bites_trains_like_the_twin(model_type, config, masked):
    twin = tiny_causal_lm(model_type, config=config)
    model = optimize(tiny_causal_lm(model_type, config=config), sample=batch(0, length=19))
    assert report(model).verified and {m is not None for m in _sdpa_masks(model)} == masked
    assert _close(train_losses(twin), train_losses(model))


def test_the_skip_applies_only_while_dynamo_traces(monkeypatch):
    """Eager code running while a graft call is in flight (another thread's model) still gets
    HF's builder: the flag only changes what Dynamo traces."""
    from transformers import masking_utils

    from rewriter import capture

    wrapped = capture._eager_skip(masking_utils.create_causal_mask)
    monkeypatch.setattr(capture, "SKIP_MASKS", True)
    assert not torch.compiler.is_compiling()
    assert wrapped.__wrapped__ is masking_utils.create_causal_mask and wrapped.__module__ == capture.__name__
    seen = []

    def build(*args, **kwargs):
        seen.append(kwargs)
        return "hf's mask"

    assert capture._eager_skip(build)(attention_mask=None) == "hf's mask" and seen
