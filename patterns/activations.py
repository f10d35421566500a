"""Gated MLP activations: SwiGLU's silu(gate) * up."""

from __future__ import annotations

import torch.nn.functional as F

from kernels.swiglu import swiglu, swiglu_unsupported
from rewriter.match import Match, Pattern
from rewriter.registry import register_pattern


def hf_silu_mul(gate, up):
    """The elementwise part of LlamaMLP / MistralMLP.forward, act_fn(gate_proj(x)) * up_proj(x),
    with act_fn = ACT2FN["silu"] (nn.SiLU: F.silu in the captured graph). Another activation
    (GeLU) is another op at the same place and does not match."""
    return F.silu(gate) * up


def swiglu_guard(m: Match) -> str | None:
    gate, up = m.input("gate"), m.input("up")
    reason = swiglu_unsupported(gate, up)
    if reason:
        return reason
    if gate.device.type not in ("cuda", "cpu"):
        return f"unsupported device {gate.device}"
    return None


def replace_swiglu(gate, up):
    return swiglu(gate, up)


SWIGLU = register_pattern(
    Pattern(
        name="swiglu",
        search=hf_silu_mul,
        inputs={"gate": ("T", "I"), "up": ("T", "I")},
        replace=replace_swiglu,
        guard=swiglu_guard,
        expect=("MLP",),
    )
)
