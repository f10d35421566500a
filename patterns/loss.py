"""Loss patterns: the lm_head and HF's causal-LM cross-entropy, fused (no full logits)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kernels.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from rewriter.match import Match, Pattern
from rewriter.registry import register_pattern

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def hf_lm_head_causal_lm_loss(hidden_states, weight, labels, reduction: Literal["mean", "sum"] = "mean"):
    """LlamaForCausalLM.forward's `self.lm_head(hidden_states)` (nn.Linear, no bias) followed by
    transformers.loss.loss_utils.ForCausalLMLoss + fixed_cross_entropy, as transformers writes
    them. With num_items_in_batch HF's reduction is "sum" and the division by it follows the
    match in the graph (it stays there: our op returns the sum, autograd scales by 1/N). The
    view's size binds as the wildcard "V" (weight's first dimension)."""
    logits = F.linear(hidden_states, weight, None)  # nn.Linear(bias=False) passes bias=None
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    logits = logits.view(-1, weight.shape[0])  # HF: view(-1, vocab_size)
    shift_labels = shift_labels.view(-1)
    shift_labels = shift_labels.to(logits.device)
    return F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction=reduction)


def linear_cross_entropy_guard(m: Match) -> str | None:
    x, w, labels = m.input("hidden_states"), m.input("weight"), m.input("labels")
    if m.captures["reduction"] not in ("mean", "sum"):
        return f"reduction {m.captures['reduction']!r} is not supported"
    if x.dtype not in SUPPORTED_DTYPES or w.dtype != x.dtype:
        return f"unsupported dtypes {x.dtype} / {w.dtype}"
    if w.dim() != 2 or x.shape[-1] != w.shape[1] or m.captures["V"] != w.shape[0]:
        return f"weight {tuple(w.shape)} does not fit hidden size {x.shape[-1]} and vocab {m.captures['V']}"
    if labels.dtype != torch.int64 or labels.shape != x.shape[:-1]:
        return f"labels {tuple(labels.shape)} {labels.dtype} do not fit hidden states {tuple(x.shape)}"
    if x.device.type not in ("cuda", "cpu") or w.device != x.device:
        return f"unsupported devices {x.device} / {w.device}"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on: the lm_head would not run in the weights' dtype"
    return None


def fused_linear_cross_entropy(hidden_states, weight, labels, *, reduction, V, device):
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden_states.device)  # HF's shift
    return linear_cross_entropy(hidden_states, weight, shift_labels, reduction=reduction)


LINEAR_CROSS_ENTROPY = register_pattern(
    Pattern(
        name="linear_cross_entropy",
        search=hf_lm_head_causal_lm_loss,
        inputs={"hidden_states": ("B", "S", "H"), "weight": ("V", "H"), "labels": ("B", "S", torch.int64)},
        replace=fused_linear_cross_entropy,
        guard=linear_cross_entropy_guard,
        drops_graph_outputs=True,
    )
)
