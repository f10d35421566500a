"""Rotary position embedding: HF's apply_rotary_pos_emb on q and k, one match per attention block."""

from __future__ import annotations

import torch

from kernels.rope import rope, rope_unsupported
from rewriter.match import Match, Pattern, only_reader
from rewriter.registry import register_pattern


def rotate_half(x):
    """transformers' rotate_half (Llama, Mistral), as it writes it."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin):
    """apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1), as transformers writes it. The
    unsqueeze dim is fixed here (not a wildcard): 1 is the (B, H, S, D) layout the kernel takes."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def rope_guard(m: Match) -> str | None:
    q, k, cos, sin = (m.input(n) for n in ("q", "k", "cos", "sin"))
    reason = rope_unsupported(q, k, cos, sin)
    if reason:
        return reason
    # The split point of rotate_half is a size wildcard: it must be half the head dim, or the
    # model rotates something else that only looks the same.
    splits = {v for v in m.captures.values() if isinstance(v, int) and not isinstance(v, bool)}
    if splits != {q.shape[-1] // 2}:
        return f"rotate_half splits at {sorted(splits)}, not at head_dim / 2 = {q.shape[-1] // 2}"
    if q.device.type not in ("cuda", "cpu"):
        return f"unsupported device {q.device}"
    return None


def replace_rope(q, k, cos, sin, **_split):
    return rope(q, k, cos, sin)


def replace_rope_in_place(q, k, cos, sin, **_split):
    return rope(q, k, cos, sin, inplace=True)


def choose_rope(m: Match):
    """In place where the graph proves q and k (and the projection outputs they view) are read
    by this match alone, and are not the same memory; else out of place."""
    q, k = only_reader(m, "q"), only_reader(m, "k")
    if q is not None and k is not None and not q & k:
        return replace_rope_in_place
    return replace_rope


ROPE = register_pattern(
    Pattern(
        name="rope",
        search=hf_apply_rotary_pos_emb,
        inputs={"q": ("B", "H", "S", "D"), "k": ("B", "K", "S", "D"), "cos": ("B", "S", "D"), "sin": ("B", "S", "D")},
        replace=replace_rope,
        guard=rope_guard,
        expect=("Attention",),
        choose=choose_rope,
    )
)
