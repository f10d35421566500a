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

In bf16 the rank-r terms of y (and of dx) are folded into the base GEMM as extra reduction
columns where a producer writes the input straight into the wider buffer (kernels/fold.py):
y is then rounded once, no less accurate than PEFT's three roundings, and up_add's extra read
and write of y is gone.

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

from kernels import fold, lowrank, swiglu
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


def _dense_weights(projections: Sequence[Projection], device: torch.device, extra: int = 0) -> torch.Tensor:
    """The stacked base weights (sum of N_i, K + extra), each made dense straight into its rows;
    the extra columns (the LoRA fold's, kernels/fold.py) are left for the caller."""
    if len(projections) == 1 and not extra:
        return projections[0].weight(None)
    rows = sum(p.out_features for p in projections)
    k = projections[0].in_features
    wide = torch.empty((rows, k + extra), dtype=projections[0].compute_dtype, device=device)
    _dense_into(projections, wide[:, :k])
    return wide


def _dense_into(projections: Sequence[Projection], out: torch.Tensor) -> None:
    """Each projection's dense base weight into its block of rows of out (sum N_i, K)."""
    for p, part in zip(projections, out.split([p.out_features for p in projections])):
        p.weight(part)


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


def fold_columns(projections: Sequence[Projection], As, x_dtype: torch.dtype) -> int:
    """The extra input columns lora_forward's x_ext needs to fold the LoRA terms into the base
    GEMM (kernels/fold.py), or 0 where they are added after it."""
    k = projections[0].in_features
    return fold.columns(k, [A.shape[0] for A in As], x_dtype, projections[0].compute_dtype)


def _downs(x: torch.Tensor, projections: Sequence[Projection], As):
    """u = [u_1 | ... | u_k] (M, R) fp32, the u_i as its column blocks, the dropout states."""
    if _merged_rank(projections, As) or len(projections) == 1 and projections[0].dropout == 0:
        u = lowrank.down(x, torch.cat(As) if len(As) > 1 else As[0])  # one launch for every x A_i^T
        return u, list(u.split([A.shape[0] for A in As], dim=1)), [None] * len(projections)
    us, states = [], []
    for p, A in zip(projections, As):
        state = None
        if p.dropout > 0:
            state = _rng_state(x.device)
            us.append(lowrank.down(F.dropout(x.to(A.dtype), p.dropout, training=True), A))
        else:
            us.append(lowrank.down(x, A))
        states.append(state)
    return None, us, states


def lora_forward(x: torch.Tensor, projections: Sequence[Projection], As, Bs, biases, x_ext=None):
    """Forward of projections sharing x (M, K): outputs (column blocks of one buffer), the u's
    and the dropout states. With x_ext, x is the first K columns of that (M, K + e) buffer
    (e = fold_columns(...)) and the LoRA terms are folded into the base GEMM (kernels/fold.py);
    else they are added after it (lowrank.up_add_, PEFT's cast points)."""
    d, c, k = x.dtype, projections[0].compute_dtype, x.shape[1]
    u, us, states = _downs(x, projections, As)
    widths = [p.out_features for p in projections]
    bias = _biases(projections, biases, x.device)
    if x_ext is not None:
        w = _dense_weights(projections, x.device, extra=x_ext.shape[1] - k)
        fold.fill_weight(w, Bs, k)
        fold.fill_input(x_ext, u if u is not None else torch.cat(us, dim=1), [A.shape[0] for A in As],
                        [p.scaling for p in projections], k)  # fmt: skip
        return list(F.linear(x_ext, w, bias).split(widths, dim=1)), us, states
    y = F.linear(x.to(c), _dense_weights(projections, x.device), bias).to(d)
    blocks = y.split(widths, dim=1)
    bounds = _segments(projections, As) if u is not None and len(projections) > 1 else None
    if bounds is not None:  # one launch for every y_i += s_i u_i B_i^T
        scales = [p.scaling for p in projections]
        lowrank.up_add_(y, u, torch.cat(Bs), scales, round_first=projections[0].quantized, bounds=bounds)
    else:
        for p, B, y_p, u_p in zip(projections, Bs, blocks, us):
            lowrank.up_add_(y_p, u_p, B, p.scaling, round_first=p.quantized)
    return list(blocks), us, states


def dx_fold_columns(projections: Sequence[Projection], As, dtype: torch.dtype) -> int:
    """The extra columns of the stacked gradient D that fold dx's rank-r term into the dx GEMM
    (dx = [D | G0 | G1] [W; Ad; Ad], kernels/fold.py), or 0: only where one G serves every
    projection (no dropout: its mask applies to each term)."""
    if any(p.dropout > 0 for p in projections) or len(projections) > 1 and not _merged_rank(projections, As):
        return 0
    rows = sum(p.out_features for p in projections)
    return fold.columns(rows, [A.shape[0] for A in As], dtype, projections[0].compute_dtype)


def _dense_rows(projections: Sequence[Projection], device: torch.device, As, extra: int) -> torch.Tensor:
    """The stacked base weights (sum N_i, K), and with extra the fold's rows [Ad; Ad; 0] after them."""
    if not extra:
        return _dense_weights(projections, device)
    rows = sum(p.out_features for p in projections)
    w = torch.empty((rows + extra, projections[0].in_features), dtype=projections[0].compute_dtype, device=device)
    _dense_into(projections, w[:rows])
    fold.fill_rows(w, As, rows)
    return w


def _stacked_gradient(grads, projections, As, stacked, need_stacked: bool):
    """(D, D_ext): the gradients side by side, and the (M, sum N_i + e) buffer holding D with the
    dx fold's columns after it, or None. A given `stacked` with more columns than D is such a
    buffer. Else one is built where the copy is no dearer than what it saves: several gradients
    are concatenated anyway, and one is copied (2 M N b bytes) only if N < K (the dx term's
    up_add moves 2 M K b)."""
    rows = sum(p.out_features for p in projections)
    if stacked is not None and stacked.shape[1] > rows:
        return stacked[:, :rows], stacked
    if stacked is None and (len(grads) > 1 or rows < projections[0].in_features):
        e = dx_fold_columns(projections, As, grads[0].dtype)
        if e:
            wide = torch.empty((grads[0].shape[0], rows + e), dtype=grads[0].dtype, device=grads[0].device)
            fold.stack_into(wide[:, :rows], grads)
            return wide[:, :rows], wide
    if stacked is None and need_stacked:
        stacked = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
    return stacked, None


def _base_dx(grads, projections, D, D_ext, As, one_at_a_time: bool) -> torch.Tensor:
    """c(D) W, with the fold's term G Ad when D_ext holds it (into the last GEMM), in D's dtype
    (x's: the outputs have x's dtype)."""
    dtype, device = grads[0].dtype, grads[0].device
    c = projections[0].compute_dtype
    rows = sum(p.out_features for p in projections)
    extra = 0 if D_ext is None else D_ext.shape[1] - rows
    if not one_at_a_time:
        return ((D if D_ext is None else D_ext).to(c) @ _dense_rows(projections, device, As, extra)).to(dtype)
    # gate and up of an MLP: one dense weight at a time (half the peak); the second GEMM
    # accumulates into the first's result (no (M, K) temporary; one rounding of the sum,
    # where eager autograd rounds each path's dx and then their sum)
    dx, start = None, 0
    for i, (p, grad) in enumerate(zip(projections, grads)):
        if D_ext is not None and i == len(projections) - 1:  # the last one carries the fold's columns
            grad, w = D_ext[:, start:], _dense_rows([p], device, As, extra)
        else:
            w = p.weight(None)
        dx = grad.to(c) @ w if dx is None else dx.addmm_(grad.to(c), w)
        start += p.out_features
    return dx.to(dtype)


def lora_dAs(x: torch.Tensor, G: torch.Tensor, As) -> list[torch.Tensor]:
    """dA_i = g_i^T x for G = [g_1 | ... | g_k], in each A's dtype."""
    return [d.to(A.dtype) for d, A in zip(lowrank.grad(x, G).split([A.shape[0] for A in As]), As)]


def lora_backward(x, grads, projections, As, Bs, us, states, needs_bias_grad, stacked=None):
    """Backward of lora_forward: dx, and dA, dB, db per projection. `stacked` is the grads
    side by side in one (M, sum N_i) tensor, if the caller already has it; it may be the first
    columns of a buffer with dx_fold_columns(...) more, which the fold then fills. x may be
    None (no dropout): then G = [g_1 | ... | g_k] comes back in dA's place, for the caller to
    finish with lora_dAs once it has x."""
    rows = sum(p.out_features for p in projections)
    merged = _merged_rank(projections, As)
    bounds = _segments(projections, As) if merged else None
    c = projections[0].compute_dtype
    one_at_a_time = len(projections) > 1 and rows * projections[0].in_features * c.itemsize > STACKED_WEIGHT_BYTES
    D, D_ext = _stacked_gradient(grads, projections, As, stacked, not one_at_a_time or bounds is not None)
    dbs = [grad.sum(0) if bias_grad else None for grad, bias_grad in zip(grads, needs_bias_grad)]
    if merged or D_ext is not None:  # one G = [g_1 | ... | g_k] for every dA_i and every dx term
        scales = [p.scaling for p in projections]
        if bounds is not None:  # one launch for every dB_i and one for every g_i, from D
            dB_all = lowrank.grad(D, torch.cat(us, dim=1), scales, bounds, rank=As[0].shape[0], transposed=True)
            cuts = [0, *bounds, rows]
            dBs = [dB_all[:, a:b].t().to(B.dtype) for a, b, B in zip(cuts, cuts[1:], Bs)]
            G = lowrank.down(D, torch.cat(Bs).t(), scales, bounds)
        else:
            dBs = [
                lowrank.grad(grad, u, p.scaling, transposed=True).t().to(B.dtype)
                for p, B, u, grad in zip(projections, Bs, us, grads)
            ]
            Gs = [lowrank.down(grad, B.t(), p.scaling) for p, B, grad in zip(projections, Bs, grads)]
            G = Gs[0] if len(Gs) == 1 else torch.cat(Gs, dim=1)
        dAs = G if x is None else lora_dAs(x, G, As)
        if D_ext is not None:  # dx's term rides in the dx GEMM (G already carries the scales)
            fold.fill_input(D_ext, G, [A.shape[0] for A in As], [1.0] * len(As), rows)
            return _base_dx(grads, projections, D, D_ext, As, one_at_a_time), dAs, dBs, dbs
        dx = _base_dx(grads, projections, D, None, As, one_at_a_time)
        lowrank.up_add_(dx, G, torch.cat(As).t())
        return dx, dAs, dBs, dbs
    dx = _base_dx(grads, projections, D, None, As, one_at_a_time)
    if x is None and any(p.dropout > 0 for p in projections):
        raise ValueError("lora_backward needs x to replay dropout")
    dAs, dBs, gs = [], [], []
    for p, A, B, u, state, grad in zip(projections, As, Bs, us, states, grads):
        dBs.append(lowrank.grad(grad, u, p.scaling, transposed=True).t().to(B.dtype))
        g = lowrank.down(grad, B.t(), p.scaling)  # s D B, (M, r) fp32
        if p.dropout > 0:
            x_d = _replay_dropout(x.to(A.dtype), p.dropout, state)
            dAs.append(lowrank.grad(x_d, g).to(A.dtype))
            gx = _replay_dropout(g @ A.float(), p.dropout, state)
            dx = (dx.float() + gx).to(x.dtype)
        else:
            gs.append(g)
            if x is not None:
                dAs.append(lowrank.grad(x, g).to(A.dtype))
            lowrank.up_add_(dx, g, A.t())
    return dx, (torch.cat(gs, dim=1) if x is None else dAs), dBs, dbs


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _norm_forward(x2: torch.Tensor, norm_weight: torch.Tensor | None, eps: float):
    """The node's input: x itself, or RMSNorm(x) and its r when the node starts with the norm."""
    if norm_weight is None:
        return x2, None
    return rmsnorm_forward(x2, norm_weight, eps)


def _wide(rows: int, cols: int, extra: int, like: torch.Tensor, dtype: torch.dtype):
    """An (rows, cols + extra) buffer for a producer to write its (rows, cols) output into (the
    fold's x_ext), or None without extra columns."""
    return torch.empty((rows, cols + extra), dtype=dtype, device=like.device) if extra else None


def _node_input(x2: torch.Tensor, norm_weight, eps: float, projections, As):
    """The first projections' input (RMSNorm(x) with the prologue), its r, and the fold's x_ext:
    the norm writes straight into x_ext's first columns. Without the norm there is no producer
    to write x there, so no fold (a copy of x would cost what the fold saves)."""
    if norm_weight is None:
        return x2, None, None
    dtype = torch.promote_types(x2.dtype, norm_weight.dtype)
    x_ext = _wide(x2.shape[0], x2.shape[1], fold_columns(projections, As, dtype), x2, dtype)
    xn, r = rmsnorm_forward(x2, norm_weight, eps, out=None if x_ext is None else x_ext[:, : x2.shape[1]])
    return xn, r, x_ext


def _norm_backward(ctx, dxn: torch.Tensor, x2: torch.Tensor, norm_weight, r):
    """dx through the norm prologue (identity without one) and the norm weight's gradient (the
    weight is the node's second input)."""
    if norm_weight is None:
        return dxn, None
    return rmsnorm_backward(dxn, x2, norm_weight, r, ctx.needs_input_grad[1])


def _own_tensor(t: torch.Tensor) -> torch.Tensor:
    """t's memory as a tensor of its own rather than a view: the projections' outputs are
    disjoint column blocks of one buffer, and as views they would share one version counter,
    so an op writing one in place (rope over q and k) would make autograd take the others
    (v) as modified too, and refuse them."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


class LoraLinearsFunction(torch.autograd.Function):
    """Projections sharing one input, optionally RMSNorm(x) (HF's, in kernels/rmsnorm.py):
    params are (A, B, bias) per projection. With the norm, x and r are saved, not RMSNorm(x):
    backward recomputes it (one elementwise pass) and runs the norm's backward after dx."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_eps, projections, *params):
        As, Bs, biases = params[0::3], params[1::3], params[2::3]
        x2 = _flat(x)
        xn, r, x_ext = _node_input(x2, norm_weight, norm_eps, projections, As)
        outputs, us, states = lora_forward(xn, projections, As, Bs, biases, x_ext)
        ctx.save_for_backward(x2, norm_weight, r, *As, *Bs, *us)
        ctx.projections, ctx.states, ctx.x_shape, ctx.eps = projections, states, x.shape, norm_eps
        ctx.bias_grads = [b is not None and b.requires_grad for b in biases]
        return tuple(_own_tensor(y.view(*x.shape[:-1], y.shape[-1])) for y in outputs)

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


def silu_mul(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """HF's cast points: silu in fp32 rounded to e's dtype, then the product rounded; into out
    (row-strided) when given."""
    if use_triton(e, g):
        return swiglu.silu_mul(e, g, out)
    h = F.silu(e.float()).to(e.dtype) * g
    return h if out is None else out.copy_(h)


def silu_mul_backward(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, de: torch.Tensor, dg: torch.Tensor, h=None
) -> None:
    """de, dg <- the SwiGLU backward (kernels/swiglu.py has the derivation), in place; and h <-
    silu(e) * g (the forward's bits) when given."""
    if use_triton(dh, e, g):
        swiglu.silu_mul_backward(dh, e, g, de, dg, h)
        return
    e32, g32, dh32 = e.float(), g.float(), dh.float()
    s = torch.sigmoid(e32)
    de.copy_(dh32 * g32 * s * (1 + e32 * (1 - s)))
    dg.copy_(dh32 * (e32 * s))
    if h is not None:
        h.copy_(silu_mul(e, g))


class LoraMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each a LoRA projection; params: (A, B, bias) x 3."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_eps, gate, up, down, need_output, *params):
        As, Bs, biases = params[0::3], params[1::3], params[2::3]
        x2 = _flat(x)
        xn, r, x_ext = _node_input(x2, norm_weight, norm_eps, [gate, up], As[:2])
        (e, g), us_in, states_in = lora_forward(xn, [gate, up], As[:2], Bs[:2], biases[:2], x_ext)
        del xn, x_ext
        h_ext = _wide(e.shape[0], e.shape[1], fold_columns([down], As[2:], e.dtype), e, e.dtype)
        h = silu_mul(e, g, out=None if h_ext is None else h_ext[:, : e.shape[1]])
        if need_output:
            (out,), (u_down,), (state_down,) = lora_forward(h, [down], As[2:], Bs[2:], biases[2:], h_ext)
        else:
            # a checkpoint's recompute, which only needs what backward saves: down's u (the same
            # call lora_forward makes), not down's GEMM (a third of the MLP's FLOPs). The output
            # is NaN so that a caller using it anyway gets no plausible wrong answer.
            _, (u_down,), (state_down,) = _downs(h, [down], As[2:])
            out = torch.full((h.shape[0], down.out_features), float("nan"), dtype=h.dtype, device=h.device)
        del h, h_ext
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
        # down's dA needs h = silu(e) * g, which SwiGLU's backward (reading e and g anyway) writes
        # after dh; with dropout h is needed first (the mask is replayed on it)
        h = silu_mul(e, g) if down.dropout > 0 else None
        dh, dA_or_G, (dB_d,), (db_d,) = lora_backward(
            h, [_flat(dout)], [down], As[2:], Bs[2:], us[2:], ctx.states[2:], ctx.bias_grads[2:]
        )
        # [de | dg]: the stacked gradient of the gate/up GEMM, with the dx fold's columns after it
        extra = dx_fold_columns([gate, up], As[:2], eg.dtype)
        deg = torch.empty((eg.shape[0], eg.shape[1] + extra), dtype=eg.dtype, device=eg.device)
        de, dg = deg[:, : eg.shape[1]].split([gate.out_features, up.out_features], dim=1)
        if h is None:  # h overwrites dh in place (each element read before it is written)
            h = dh
            silu_mul_backward(dh, e, g, de, dg, h)
            (dA_d,) = lora_dAs(h, dA_or_G, As[2:])
        else:
            silu_mul_backward(dh, e, g, de, dg)
            (dA_d,) = dA_or_G
        del dh, h  # (tokens, intermediate) each: freed as soon as they are used, to lower the peak
        xn, _ = _norm_forward(x2, norm_weight, ctx.eps)
        dxn, dA_in, dB_in, db_in = lora_backward(
            xn, [de, dg], [gate, up], As[:2], Bs[:2], us[:2], ctx.states[:2], ctx.bias_grads[:2], stacked=deg
        )
        del xn, deg, de, dg
        dx, dw = _norm_backward(ctx, dxn, x2, norm_weight, r)
        params = [grad for triple in zip((*dA_in, dA_d), (*dB_in, dB_d), (*db_in, db_d)) for grad in triple]
        return (dx.view(ctx.x_shape), dw, None, None, None, None, None, *params)


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
    need_output: bool = True,
):
    """down(silu(gate(x)) * up(x)) with LoRA on all three; params are (A, B, bias) x 3. With
    norm=(weight, eps) the MLP reads RMSNorm(x). need_output=False is for recomputing the
    saved tensors only: down's GEMM is skipped and the output is NaN."""
    weight, eps = norm if norm is not None else (None, 0.0)
    return LoraMLPFunction.apply(x, weight, eps, gate, up, down, need_output, *params)
