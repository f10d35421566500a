"""Attention: SDPA given a materialised causal mask runs as SDPA with is_causal=True.

Eager HF skips building the causal mask when no token is padded and calls SDPA with
is_causal=True (flash kernels). Under Dynamo some transformers/torch pairs never skip (with
torch < 2.14 Dynamo folds `torch.compiler.is_exporting()` to True, and HF then keeps the mask):
the captured graph builds a (B, 1, S, S) mask and SDPA takes its masked path, which measured
2.6-3.1x slower than eager's on the 8B model (H200, 2026-11-29). This pattern hands SDPA
is_causal=True instead, and only where that is the same function:

- a mask that reads no input tensor (no padding mask, no positions passed in) is a function of
  the shapes and size inputs alone: it is checked once per shape;
- a mask that reads an input (the attention_mask a data collator passes, all ones when nothing
  is padded) is checked once per mask tensor: the decoder layers share one mask, so that is one
  check (one host sync, as HF eager's own `padding_mask.all()`) per step;
- the check: the mask allows exactly the causal triangle (a bool mask True on and below the
  diagonal, or an additive one 0 there and -inf or the dtype's minimum above it). Any other
  mask (padding, a sliding window that bites) runs the original masked SDPA.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.fx import Node

from rewriter.match import Candidate, GraphContext, Match
from rewriter.registry import register_pattern


def is_causal_mask(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    """Does `mask` (broadcastable to (B, H, q_len, kv_len)) allow exactly the causal triangle?"""
    if q_len != kv_len or mask.shape[-2:] != (q_len, kv_len):
        return False
    if mask.dtype == torch.bool:
        allowed, blocked_ok = mask, True
    else:
        allowed = mask == 0
        blocked_ok = bool((allowed | (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)).all())
    triangle = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    return blocked_ok and bool((allowed == triangle).all())


def causal_attention(
    q, k, v, mask, *sizes, dropout_p: float, scale: float | None, enable_gqa: bool, verdicts=None, last=None
):
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, ...), with is_causal=True when
    the mask is the causal one. Only a match passes a cache: `verdicts` (per shape and size
    inputs, where the graph proved the mask depends on nothing else) or `last` (the verdict on
    the last mask tensor seen, shared by the layers that read the same mask node)."""
    causal = None
    if verdicts is not None:
        key = (tuple(mask.shape), mask.dtype, mask.device, tuple(q.shape), tuple(k.shape), sizes)
        causal = verdicts.get(key)
    elif last is not None:
        seen = last.get("mask")
        if seen is not None and seen() is mask and last["key"] == (mask._version, q.shape[-2], k.shape[-2]):
            causal = last["causal"]
    if causal is None:
        causal = is_causal_mask(mask, q.shape[-2], k.shape[-2])
        if verdicts is not None:
            verdicts[key] = causal
        elif last is not None:
            last.update(mask=weakref.ref(mask), key=(mask._version, q.shape[-2], k.shape[-2]), causal=causal)
    if causal:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, scale=scale, is_causal=True, enable_gqa=enable_gqa
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, is_causal=False, enable_gqa=enable_gqa
    )


def _checked(cache: dict):
    """causal_attention bound to one match's cache (a named function: graphs name nodes after it)."""

    def causal_attention_checked(q, k, v, mask, *sizes, dropout_p, scale, enable_gqa):
        return causal_attention(q, k, v, mask, *sizes, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa, **cache)

    return causal_attention_checked


def _reads_size_only(node: Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size)
    )


def _ancestors(node: Node) -> set[Node]:
    """Every node `node`'s value depends on; a tensor whose size alone is read is not one."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if _reads_size_only(n):
            continue
        for x in n.all_input_nodes:
            if x not in seen:
                seen.add(x)
                stack.append(x)
    return seen


def _is_tensor(node: Node, ctx: GraphContext) -> bool:
    value = ctx.values.get(node, node.meta.get("example_value"))
    return isinstance(value, torch.Tensor)


class CausalMaskPattern:
    """Finds SDPA calls whose attn_mask is built in the graph from shapes alone."""

    name = "causal_attention"
    guard = None
    expect: tuple[str, ...] = ()
    drops_graph_outputs = False
    source = __file__

    def candidates(self, ctx: GraphContext, claimed: set[Node]) -> Iterator[Candidate]:
        shared: dict[Node, dict] = {}  # mask node -> the run-time verdict its readers share
        for node in ctx.graph.nodes:
            if node.op != "call_function" or node.target is not F.scaled_dot_product_attention or node in claimed:
                continue
            module, cls = ctx.module_of(node)
            mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
            if not isinstance(mask, Node):
                continue  # no mask: nothing to do
            why = self._refusal(node, mask, ctx)
            if why:
                yield Candidate(module, cls, reason=why)
                continue
            ancestors = _ancestors(mask)
            if any(p.op == "placeholder" and _is_tensor(p, ctx) for p in ancestors):
                sizes, cache = [], {"last": shared.setdefault(mask, {})}  # one check per mask tensor
            else:
                sizes = sorted(
                    (p for p in ancestors if p.op == "placeholder"), key=ctx.order.__getitem__
                )  # size inputs (SymInts) of a dynamic graph: part of the per-shape key
                cache = {"verdicts": {}}
            q, k, v = node.args[:3]
            kwargs = node.kwargs
            captures = {
                "dropout_p": kwargs.get("dropout_p", 0.0),
                "scale": kwargs.get("scale"),
                "enable_gqa": kwargs.get("enable_gqa", False),
            }
            match = Match(
                pattern=self,
                inputs=[q, k, v, mask, *sizes],
                outputs=[node],
                nodes=[node],
                captures=captures,
                module=module,
                replace=_checked(cache),
            )
            yield Candidate(module, cls, match=match)

    @staticmethod
    def _refusal(node: Node, mask: Node, ctx: GraphContext) -> str | None:
        if len(node.args) != 3 or set(node.kwargs) - {"attn_mask", "dropout_p", "scale", "is_causal", "enable_gqa"}:
            return "scaled_dot_product_attention called with arguments this pattern does not know"
        if node.kwargs.get("is_causal", False):
            return "SDPA already has is_causal=True"
        if node.kwargs.get("dropout_p", 0.0) != 0.0:
            return "attention dropout > 0: is_causal would draw a different dropout mask"
        return None

    def __repr__(self) -> str:
        return f"CausalMaskPattern({self.name!r})"


CAUSAL_ATTENTION = register_pattern(CausalMaskPattern())
