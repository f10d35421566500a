"""Normalisation patterns."""

from __future__ import annotations

import torch

from kernels.rmsnorm import rmsnorm
from rewriter.match import Match, Pattern
from rewriter.registry import register_pattern

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def hf_rmsnorm(hidden_states, weight, variance_epsilon=1e-6):
    """LlamaRMSNorm.forward (also Mistral's, Qwen2's), as transformers writes it."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon)
    return weight * hidden_states.to(input_dtype)


def rmsnorm_guard(m: Match) -> str | None:
    x, w = m.input("hidden_states"), m.input("weight")
    if m.captures["dtype"] != x.dtype:
        return f"casts back to {m.captures['dtype']}, not to the input dtype {x.dtype}"
    if x.dtype not in SUPPORTED_DTYPES or w.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtypes {x.dtype} / {w.dtype}"
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        return f"weight shape {tuple(w.shape)} does not fit hidden size {x.shape[-1]}"
    if x.device.type not in ("cuda", "cpu"):
        return f"unsupported device {x.device}"
    return None


def replace_rmsnorm(hidden_states, weight, *, variance_epsilon, dtype):
    return rmsnorm(hidden_states, weight, variance_epsilon)


RMSNORM = register_pattern(
    Pattern(
        name="rmsnorm",
        search=hf_rmsnorm,
        inputs={"hidden_states": ("T", "H"), "weight": ("H",)},
        replace=replace_rmsnorm,
        guard=rmsnorm_guard,
        expect=("RMSNorm",),
    )
)
