"""LoRA projections over a frozen base weight (dense or 4-bit), forward and backward by hand.

One projection. x is (M, K) in dtype d; the frozen base weight W is (N, K), made dense on demand
in the compute dtype c (dequantized, for 4-bit); b is an optional base bias; the trainable LoRA
factors are A (r, K) and B (N, r) in dtype a (PEFT keeps them in fp32 for half-precision models);
s is the scaling and m the dropout mask of rate p:

    x_a = a(x)                      PEFT casts x to the adapter dtype
    x_d = x_a * m / (1 - p)
    u   = x_d A^T                   (M, r), saved
    y   = d(c(x) W^T + b) + d(s u B^T)      4-bit base (PEFT's Linear4bit: the LoRA term is
                                            cast to x's dtype, then added in that dtype)
    y   = d(x W^T + b + s u B^T)            dense base (PEFT's Linear: added in promote(d, a))

Backward, with D = dL/dy (so dL/d(s u B^T) = a(D) under either cast; casts are identity for
derivatives):

    dB = s a(D)^T u                 (N, r)
    g  = s a(D) B                   (M, r)
    dA = g^T x_d                    (r, K)
    dx = d( c(D) W  +  (g A) * m / (1 - p) )      accumulated in fp32, rounded once
    db = sum over rows of D         (only if the bias is trainable)

W is frozen: no dW, and B A is never formed. Saved for backward: x and u only. W is made dense
again in backward instead of being kept; the dropout mask is not kept either: the generator
state before the forward's dropout is saved and replayed, so the backward rebuilds exactly the
same x_d (PyTorch's own dropout, so the mask equals the one PEFT would draw).

Several projections reading the same x (q, k and v) are one node: their weights are stacked so
forward is one GEMM of N = sum of the N_i, backward's c(D) W one GEMM of K = sum of the N_i
(above STACKED_WEIGHT_BYTES, e.g. the 8B's gate|up, one dense weight at a time, summed), and
dx is accumulated once; without dropout their rank-r products share launches too (x [A_q; A_k;
A_v]^T, [g_q g_k g_v]^T x and dx += [g_q g_k g_v] [A_q; A_k; A_v], the same sums). The MLP
(gate, up, SwiGLU, down) is one node that saves x, e = gate(x) and g = up(x) (plus the rank-r
u's); h = silu(e) * g is recomputed in backward. Either node can start with HF's RMSNorm of x:
it then saves x and the norm's r instead of the norm's output, recomputes that output in
backward and runs the norm's backward (kernels/rmsnorm.py) on dx.

Memory, per projection and token, against PEFT eager (bf16 x, fp32 adapters): eager keeps x
(bf16) for the base matmul and a(x) (fp32, 2x the bytes) for lora_A, plus u; we keep x and u.
For the MLP eager also keeps silu(e), its input and h and a(h); we keep e and g.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import lowrank, swiglu
from kernels.rmsnorm import rmsnorm_backward, rmsnorm_forward
from kernels.runtime import use_triton

# Above this size a backward makes the frozen weights dense one projection at a time rather than
# stacked (Llama-8B: q|k|v is 48 MiB and stays stacked, gate|up would be 224 MiB).
STACKED_WEIGHT_BYTES = 64 * 2**20
# Up to this total rank, the projections of one node share their rank-r launches (q|k|v at r=16:
# 48); host time per launch is what the 8B step was short of (benchmarks/RESULTS.md).
MERGED_RANK = 64


@dataclass(frozen=True, eq=False)
class Projection:
    """The frozen half of a LoRA projection and its configuration."""

    weight: Callable[[torch.Tensor | None], torch.Tensor]  # dense base weight (N, K) in compute_dtype, into out
    bias: torch.Tensor | None  # the frozen base bias, or None
    scaling: float
    dropout: float
    compute_dtype: torch.dtype
    quantized: bool  # 4-bit base: the LoRA term is cast to x's dtype before the add
    out_features: int
    in_features: int


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _replay_dropout(t: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
    """The dropout the forward drew (same generator state, shape, dtype, device)."""
    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if t.device.type == "cuda":
            torch.cuda.set_rng_state(state, t.device)
        else:
            torch.set_rng_state(state)
        return F.dropout(t, p, training=True)


def _dense_weights(projections: Sequence[Projection], device: torch.device) -> torch.Tensor:
    """The stacked base weights (sum of N_i, K), each made dense straight into its rows."""
    if len(projections) == 1:
        return projections[0].weight(None)
    rows = sum(p.out_features for p in projections)
    stacked = torch.empty((rows, projections[0].in_features), dtype=projections[0].compute_dtype, device=device)
    for p, part in zip(projections, stacked.split([p.out_features for p in projections])):
        p.weight(part)
    return stacked


def _biases(projections: Sequence[Projection], biases, device: torch.device) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    c = projections[0].compute_dtype
    parts = [
        (b if b is not None else torch.zeros(p.out_features, device=device)).to(c) for p, b in zip(projections, biases)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _merged_rank(projections: Sequence[Projection], As) -> bool:
    """Whether the rank-r products of several projections sharing x run as one launch (their
    factors side by side): without dropout (each projection would draw its own mask), with
    one adapter dtype, and at most MERGED_RANK in all (the kernels keep a row of that width)."""
    return (
        len(projections) > 1
        and all(p.dropout == 0 for p in projections)
        and len({A.dtype for A in As}) == 1
        and sum(A.shape[0] for A in As) <= MERGED_RANK
    )


def _segments(projections: Sequence[Projection], As) -> lowrank.Segments | None:
    """Where the stacked outputs of merged projections are cut, if their rank-r products can
    also run as one segmented launch each (kernels/lowrank.py): up to three projections of
    equal rank, one cast rule, and cuts that no block of 16 straddles; else None."""
    bounds = tuple(itertools.accumulate(p.out_features for p in projections))[:-1]
    if (
        len(projections) > 3
        or len({A.shape[0] for A in As}) != 1
        or len({p.quantized for p in projections}) != 1
        or not lowrank.segment_block(bounds, 128)
    ):
        return None
    return bounds


def lora_forward(x: torch.Tensor, projections: Sequence[Projection], As, Bs, biases):
    """Forward of projections sharing x (M, K): outputs (column blocks of one buffer), the u's
    and the dropout states."""
    d = x.dtype
    c = projections[0].compute_dtype
    y = F.linear(x.to(c), _dense_weights(projections, x.device), _biases(projections, biases, x.device)).to(d)
    blocks = y.split([p.out_features for p in projections], dim=1)
    if _merged_rank(projections, As):  # one launch for every x A_i^T
        u_all = lowrank.down(x, torch.cat(As))
        us = list(u_all.split([A.shape[0] for A in As], dim=1))
        bounds = _segments(projections, As)
        if bounds is not None:  # and one for every y_i += s_i u_i B_i^T
            scales = [p.scaling for p in projections]
            lowrank.up_add_(y, u_all, torch.cat(Bs), scales, round_first=projections[0].quantized, bounds=bounds)
        else:
            for p, B, y_p, u in zip(projections, Bs, blocks, us):
                lowrank.up_add_(y_p, u, B, p.scaling, round_first=p.quantized)
        return list(blocks), us, [None] * len(projections)
    outputs, us, states = [], [], []
    for p, A, B, y_p in zip(projections, As, Bs, blocks):
        state = None
        if p.dropout > 0:
            state = _rng_state(x.device)
            u = lowrank.down(F.dropout(x.to(A.dtype), p.dropout, training=True), A)
        else:
            u = lowrank.down(x, A)
        lowrank.up_add_(y_p, u, B, p.scaling, round_first=p.quantized)
        outputs.append(y_p)
        us.append(u)
        states.append(state)
    return outputs, us, states


def lora_backward(x, grads, projections, As, Bs, us, states, needs_bias_grad, stacked=None):
    """Backward of lora_forward: dx, and dA, dB, db per projection. `stacked` is the grads
    side by side in one (M, sum N_i) tensor, if the caller already has it."""
    c = projections[0].compute_dtype
    rows = sum(p.out_features for p in projections)
    merged = _merged_rank(projections, As)
    bounds = _segments(projections, As) if merged else None
    one_at_a_time = len(projections) > 1 and rows * projections[0].in_features * c.itemsize > STACKED_WEIGHT_BYTES
    D = stacked
    if D is None and (not one_at_a_time or bounds is not None):  # the stacked gradient, where it is used
        D = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
    if one_at_a_time:
        # gate and up of an MLP: one dense weight at a time (half the peak); the second GEMM
        # accumulates into the first's result (no (M, K) temporary; one rounding of the sum,
        # where eager autograd rounds each path's dx and then their sum)
        dx = None
        for p, grad in zip(projections, grads):
            dx = grad.to(c) @ p.weight(None) if dx is None else dx.addmm_(grad.to(c), p.weight(None))
        dx = dx.to(x.dtype)
    else:
        dx = (D.to(c) @ _dense_weights(projections, x.device)).to(x.dtype)
    if merged:  # one launch each for every dA_i and every dx term
        if bounds is not None:  # and for every dB_i and every g_i, from the stacked gradient
            scales = [p.scaling for p in projections]
            dB_all = lowrank.grad(D, torch.cat(us, dim=1), scales, bounds, rank=As[0].shape[0])
            cuts = [0, *bounds, rows]
            dBs = [dB_all[:, a:b].t().to(B.dtype) for a, b, B in zip(cuts, cuts[1:], Bs)]
            G = lowrank.down(D, torch.cat(Bs).t(), scales, bounds)
        else:
            dBs = [
                lowrank.grad(grad, u, p.scaling).t().to(B.dtype) for p, B, u, grad in zip(projections, Bs, us, grads)
            ]
            G = torch.cat([lowrank.down(grad, B.t(), p.scaling) for p, B, grad in zip(projections, Bs, grads)], dim=1)
        dAs = [d.to(A.dtype) for d, A in zip(lowrank.grad(x, G).split([A.shape[0] for A in As]), As)]
        lowrank.up_add_(dx, G, torch.cat(As).t())
        dbs = [grad.sum(0) if bias_grad else None for grad, bias_grad in zip(grads, needs_bias_grad)]
        return dx, dAs, dBs, dbs
    dAs, dBs, dbs = [], [], []
    for p, A, B, u, state, grad, bias_grad in zip(projections, As, Bs, us, states, grads, needs_bias_grad):
        dBs.append(lowrank.grad(grad, u, p.scaling).t().to(B.dtype))
        g = lowrank.down(grad, B.t(), p.scaling)  # s D B, (M, r) fp32
        if p.dropout > 0:
            x_d = _replay_dropout(x.to(A.dtype), p.dropout, state)
            dAs.append(lowrank.grad(x_d, g).to(A.dtype))
            gx = _replay_dropout(g @ A.float(), p.dropout, state)
            dx = (dx.float() + gx).to(x.dtype)
        else:
            dAs.append(lowrank.grad(x, g).to(A.dtype))
            lowrank.up_add_(dx, g, A.t())
        dbs.append(grad.sum(0) if bias_grad else None)
    return dx, dAs, dBs, dbs


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _norm_forward(x2: torch.Tensor, norm_weight: torch.Tensor | None, eps: float):
    """The node's input: x itself, or RMSNorm(x) and its r when the node starts with the norm."""
    if norm_weight is None:
        return x2, None
    return rmsnorm_forward(x2, norm_weight, eps)


def _norm_backward(ctx, dxn: torch.Tensor, x2: torch.Tensor, norm_weight, r):
    """dx through the norm prologue (identity without one) and the norm weight's gradient (the
    weight is the node's second input)."""
    if norm_weight is None:
        return dxn, None
    return rmsnorm_backward(dxn, x2, norm_weight, r, ctx.needs_input_grad[1])


class LoraLinearsFunction(torch.autograd.Function):
    """Projections sharing one input, optionally RMSNorm(x) (HF's, in kernels/rmsnorm.py):
    params are (A, B, bias) per projection. With the norm, x and r are saved, not RMSNorm(x):
    backward recomputes it (one elementwise pass) and runs the norm's backward after dx."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_eps, projections, *params):
        As, Bs, biases = params[0::3], params[1::3], params[2::3]
        x2 = _flat(x)
        xn, r = _norm_forward(x2, norm_weight, norm_eps)
        outputs, us, states = lora_forward(xn, projections, As, Bs, biases)
        ctx.save_for_backward(x2, norm_weight, r, *As, *Bs, *us)
        ctx.projections, ctx.states, ctx.x_shape, ctx.eps = projections, states, x.shape, norm_eps
        ctx.bias_grads = [b is not None and b.requires_grad for b in biases]
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outputs)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.projections)
        x2, norm_weight, r, *rest = ctx.saved_tensors  # read once: checkpointing allows a single unpack
        As, Bs, us = rest[:n], rest[n : 2 * n], rest[2 * n :]
        xn, _ = _norm_forward(x2, norm_weight, ctx.eps)
        dxn, dAs, dBs, dbs = lora_backward(
            xn, [_flat(g) for g in grads], ctx.projections, As, Bs, us, ctx.states, ctx.bias_grads
        )
        del xn
        dx, dw = _norm_backward(ctx, dxn, x2, norm_weight, r)
        params = [grad for triple in zip(dAs, dBs, dbs) for grad in triple]
        return (dx.view(ctx.x_shape), dw, None, None, *params)


def silu_mul(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """HF's cast points: silu in fp32 rounded to e's dtype, then the product rounded."""
    if use_triton(e, g):
        return swiglu.silu_mul(e, g)
    return F.silu(e.float()).to(e.dtype) * g


def silu_mul_backward(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, de: torch.Tensor, dg: torch.Tensor) -> None:
    """de, dg <- the SwiGLU backward (kernels/swiglu.py has the derivation), in place."""
    if use_triton(dh, e, g):
        swiglu.silu_mul_backward(dh, e, g, de, dg)
        return
    e32, g32, dh32 = e.float(), g.float(), dh.float()
    s = torch.sigmoid(e32)
    de.copy_(dh32 * g32 * s * (1 + e32 * (1 - s)))
    dg.copy_(dh32 * (e32 * s))


class LoraMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each a LoRA projection; params: (A, B, bias) x 3."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_eps, gate, up, down, *params):
        As, Bs, biases = params[0::3], params[1::3], params[2::3]
        x2 = _flat(x)
        xn, r = _norm_forward(x2, norm_weight, norm_eps)
        (e, g), us_in, states_in = lora_forward(xn, [gate, up], As[:2], Bs[:2], biases[:2])
        del xn
        h = silu_mul(e, g)
        (out,), (u_down,), (state_down,) = lora_forward(h, [down], As[2:], Bs[2:], biases[2:])
        eg = e._base if e._base is not None else torch.cat([e, g], dim=1)  # [e | g], one buffer
        ctx.save_for_backward(x2, norm_weight, r, eg, *As, *Bs, *us_in, u_down)
        ctx.eps = norm_eps
        ctx.projections = (gate, up, down)
        ctx.states = (*states_in, state_down)
        ctx.bias_grads = [b is not None and b.requires_grad for b in biases]
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        x2, norm_weight, r, eg, *rest = ctx.saved_tensors
        As, Bs, us = rest[0:3], rest[3:6], rest[6:9]
        gate, up, down = ctx.projections
        e, g = eg.split([gate.out_features, up.out_features], dim=1)
        h = silu_mul(e, g)
        dh, (dA_d,), (dB_d,), (db_d,) = lora_backward(
            h, [_flat(dout)], [down], As[2:], Bs[2:], us[2:], ctx.states[2:], ctx.bias_grads[2:]
        )
        del h  # (tokens, intermediate) each: freed as soon as they are used, to lower the peak
        deg = torch.empty_like(eg)  # [de | dg]: the stacked gradient of the gate/up GEMM
        de, dg = deg.split([gate.out_features, up.out_features], dim=1)
        silu_mul_backward(dh, e, g, de, dg)
        del dh
        xn, _ = _norm_forward(x2, norm_weight, ctx.eps)
        dxn, dA_in, dB_in, db_in = lora_backward(
            xn, [de, dg], [gate, up], As[:2], Bs[:2], us[:2], ctx.states[:2], ctx.bias_grads[:2], stacked=deg
        )
        del xn, deg, de, dg
        dx, dw = _norm_backward(ctx, dxn, x2, norm_weight, r)
        params = [grad for triple in zip((*dA_in, dA_d), (*dB_in, dB_d), (*db_in, db_d)) for grad in triple]
        return (dx.view(ctx.x_shape), dw, None, None, None, None, *params)


def lora_linears(
    x: torch.Tensor,
    projections: Sequence[Projection],
    *params: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None = None,
):
    """Outputs of the projections sharing x; params are (A, B, bias) per projection. With
    norm=(weight, eps) they read RMSNorm(x) instead (the norm is part of the node)."""
    weight, eps = norm if norm is not None else (None, 0.0)
    return LoraLinearsFunction.apply(x, weight, eps, tuple(projections), *params)


def lora_mlp(
    x: torch.Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    *params: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None = None,
):
    """down(silu(gate(x)) * up(x)) with LoRA on all three; params are (A, B, bias) x 3. With
    norm=(weight, eps) the MLP reads RMSNorm(x)."""
    weight, eps = norm if norm is not None else (None, 0.0)
    return LoraMLPFunction.apply(x, weight, eps, gate, up, down, *params)
