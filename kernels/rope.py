"""Rotary position embedding of queries and keys, forward and backward, as Hugging Face Llama's
`apply_rotary_pos_emb(q, k, cos, sin)` with `rotate_half` computes it: one launch for both.

Math (one head row x of even length D = 2 P, split x = [x1, x2] into halves of P; cos/sin rows
c = [c1, c2], s = [s1, s2] of the token; the two halves of c and of s are not assumed equal):

    rot(x) = [-x2, x1]                               rotate_half
    y      = x * c + rot(x) * s
    y1     = d( d(x1 c1) - d(x2 s1) )                HF's cast points (dtype d): each product
    y2     = d( d(x2 c2) + d(x1 s2) )                rounded to d, then their sum

so forward is bit-for-bit eager's (on the GPU too: the kernel is compiled without FP fusion,
else the rounded products become bf16 FMAs, one rounding fewer than eager). Backward: y is linear in x, y = C x + S R x with C, S the
diagonal matrices of c and s and R the permutation-with-sign of rot. So dx = C dy + R^T S dy,
and R^T z = [z2, -z1] (R maps [x1, x2] to [-x2, x1]; its transpose maps [z1, z2] to [z2, -z1]):

    dx1 = dy1 c1 + dy2 s2
    dx2 = dy2 c2 - dy1 s1                            computed in fp32, rounded to d once

Eager autograd rounds dy * c and the rotated dy * s to d before adding them: our error is at
most eager's. Only c and s are needed: nothing but cos and sin is saved. If cos or sin itself
requires grad (never in HF models: they come from position ids), dc = sum over heads of
dy * x and ds = sum over heads of dy * rot(x), summed over the batch where cos broadcasts;
that path saves q and k and runs in PyTorch (fp32).

Layout: q (B, Hq, S, D) and k (B, Hk, S, D) arrive as transposed views of the projection
outputs (B, S, H * D): explicit strides, no .contiguous() copies; only the last dim must
have stride 1. cos/sin are (B, S, D) or (1, S, D) (broadcast over the batch), one row per
token, so packed sequences with per-token positions work. A program takes BLOCK_T tokens
and all their q heads and k heads: cos/sin are read once per token and kept in registers,
each head row is read as two contiguous half-rows (16-byte vectors).

Out of place by default: the outputs take q's and k's memory layout (empty_like; HF's
transposed views are dense), and dq/dk are written in that layout too, so the transpose and
view backward that follow (into the projections) are free views, not copies.

In place (inplace=True) where the caller proves that q and k, and every tensor they are views
of, have no other reader (patterns/rope.py does, from the graph): the kernel writes q_embed
over q and k_embed over k (each element is read before it is written, by the same program)
and returns them; autograd wraps them as views of its inputs. mark_dirty would make autograd
rebase the projection output's view history (a CopySlices node, a copy in backward); instead
the version counter is bumped, so that autograd raises, rather than read rotated values, if
anything saved q, k or their base for its backward. Backward then writes dq over the incoming
dq_embed where that has q's layout (else into a new buffer): autograd hands that gradient to
this node alone when q_embed's only reader is attention. On an H200, fwd+bwd in place takes
45.3 us against 46.2 out of place at 4096 tokens, 166.8 against 168.3 at 16384 (the same
bytes move; why writing over the bytes just read is faster was not isolated), and the peak
of a Llama-8B LoRA step at 2048 x 2 drops by 1.25 GiB (RESULTS.md). With cos/sin requiring grad (their
gradients need q and k) it stays out of place.

Memory traffic (T = B S tokens, b bytes per element, T_c cos/sin rows): forward reads q and
k and writes two outputs of the same size, plus cos and sin once: 2 T (Hq + Hk) D b +
2 T_c D b. Backward moves the same bytes (dq_out, dk_out in; dq, dk out; cos, sin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _head_tile(
    tok, s_h, t_mask, h0, N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Element offsets of the first halves of heads h0 .. h0 + BLOCK_H of BLOCK_T tokens, and their mask."""
    d = tl.arange(0, BLOCK_D)[None, None, :]
    h = h0 + tl.arange(0, BLOCK_H)
    mask = t_mask[:, None, None] & (h < N_HEADS)[None, :, None]
    if HALF != BLOCK_D:
        mask = mask & (d < HALF)
    return tok[:, None, None] + (h.to(tl.int64) * s_h)[None, :, None] + d, mask


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr, FORWARD: tl.constexpr):
    if FORWARD:  # HF's cast points: each product rounded to the output dtype, then the sum
        y1 = (x1 * c1).to(dtype).to(tl.float32) - (x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
    else:  # the transpose rotation, fp32 throughout: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    return y1.to(dtype), y2.to(dtype)


@triton.jit
def _rotate_heads(
    X, Y, x_tok, y_tok, sx_h, sy_h, t_mask, c1, c2, s1, s2,
    N_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FORWARD: tl.constexpr,
):  # fmt: skip
    """Rotate every head row of BLOCK_T tokens, BLOCK_H heads at a time: x_tok/y_tok are the tokens' element offsets."""
    for h0 in range(0, N_HEADS, BLOCK_H):
        x_off, mask = _head_tile(x_tok, sx_h, t_mask, h0, N_HEADS, HALF, BLOCK_H, BLOCK_D)
        y_off, _ = _head_tile(y_tok, sy_h, t_mask, h0, N_HEADS, HALF, BLOCK_H, BLOCK_D)
        x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
        y1, y2 = _rotate(x1, x2, c1, c2, s1, s2, Y.dtype.element_ty, FORWARD)
        tl.store(Y + y_off, y1, mask=mask)
        tl.store(Y + y_off + HALF, y2, mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO, tokens, seq_len,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sqo_b, sqo_s, sqo_h, sko_b, sko_s, sko_h, sc_b, sc_s, ss_b, ss_s,
    HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, FORWARD: tl.constexpr, LOADS_FIRST: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < tokens
    b = t // seq_len
    s = t % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    cs_mask = t_mask[:, None] & (d < HALF)
    c_off = (b * sc_b + s * sc_s)[:, None] + d
    s_off = (b * ss_b + s * ss_s)[:, None] + d
    c1 = tl.load(COS + c_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(COS + c_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(SIN + s_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(SIN + s_off + HALF, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    q_tok, qo_tok = b * sq_b + s * sq_s, b * sqo_b + s * sqo_s
    k_tok, ko_tok = b * sk_b + s * sk_s, b * sko_b + s * sko_s
    if LOADS_FIRST:  # all heads of q and of k in one tile each: every load in flight before the first store
        q_off, q_mask = _head_tile(q_tok, sq_h, t_mask, 0, HQ, HALF, BLOCK_HQ, BLOCK_D)
        k_off, k_mask = _head_tile(k_tok, sk_h, t_mask, 0, HK, HALF, BLOCK_HK, BLOCK_D)
        q1 = tl.load(Q + q_off, mask=q_mask, other=0.0).to(tl.float32)
        q2 = tl.load(Q + q_off + HALF, mask=q_mask, other=0.0).to(tl.float32)
        k1 = tl.load(K + k_off, mask=k_mask, other=0.0).to(tl.float32)
        k2 = tl.load(K + k_off + HALF, mask=k_mask, other=0.0).to(tl.float32)
        qo_off, _ = _head_tile(qo_tok, sqo_h, t_mask, 0, HQ, HALF, BLOCK_HQ, BLOCK_D)
        ko_off, _ = _head_tile(ko_tok, sko_h, t_mask, 0, HK, HALF, BLOCK_HK, BLOCK_D)
        y1, y2 = _rotate(q1, q2, c1, c2, s1, s2, QO.dtype.element_ty, FORWARD)
        tl.store(QO + qo_off, y1, mask=q_mask)
        tl.store(QO + qo_off + HALF, y2, mask=q_mask)
        y1, y2 = _rotate(k1, k2, c1, c2, s1, s2, KO.dtype.element_ty, FORWARD)
        tl.store(KO + ko_off, y1, mask=k_mask)
        tl.store(KO + ko_off + HALF, y2, mask=k_mask)
    else:
        _rotate_heads(Q, QO, q_tok, qo_tok, sq_h, sqo_h, t_mask, c1, c2, s1, s2, HQ, HALF, BLOCK_HQ, BLOCK_D, FORWARD)
        _rotate_heads(K, KO, k_tok, ko_tok, sk_h, sko_h, t_mask, c1, c2, s1, s2, HK, HALF, BLOCK_HK, BLOCK_D, FORWARD)


# Elements of one half-row tile (tokens x heads x head_dim/2) a program holds per tensor;
# short rows (small models) take several tokens. At Llama-8B shapes that is one token per
# program, and all of its 32 q heads and 8 k heads fit one tile each: the program then issues
# every load before its first store (LOADS_FIRST, as Liger's kernel does) rather than rotating
# q before it loads k. Measured on an H200 (RESULTS.md, eighth session), fwd+bwd in place:
# 45.3 us at 4096 tokens and 166.8 at 16384, against 46.7 and 170.6 with the backward taking
# two tokens per program (its old tile, 4096) and loads first, and 45.9 and 167.7 with two
# tokens and q then k; q then k in the forward alone: 45.6 and 165.6. Evicting q and k from
# L2 first, or 4 warps, were 1-4% slower.
TILE_FORWARD = 2048
TILE_BACKWARD = 2048
LOADS_FIRST = True


def _launch(q, k, cos, sin, q_out, k_out, *, forward: bool, heads_q: int, heads_k: int) -> None:
    batch, _, seq_len, dim = q.shape
    tokens = batch * seq_len
    if tokens == 0:
        return
    half = dim // 2
    tile = TILE_FORWARD if forward else TILE_BACKWARD
    block_d = triton.next_power_of_2(half)
    block_hq = max(1, min(triton.next_power_of_2(max(heads_q, 1)), tile // block_d))
    block_hk = max(1, min(triton.next_power_of_2(max(heads_k, 1)), tile // block_d))
    block_t = max(1, min(64, tile // (block_hq * block_d)))
    warps = max(1, min(8, block_t * block_hq * block_d // 256))

    def bsh(t):  # strides of batch, sequence, head (B, H, S, D layout)
        return t.stride(0), t.stride(2), t.stride(1)

    def bs(t):  # cos/sin: a batch of 1 broadcasts
        return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)

    _rope_kernel[(triton.cdiv(tokens, block_t),)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        tokens,
        seq_len,
        *bsh(q),
        *bsh(k),
        *bsh(q_out),
        *bsh(k_out),
        *bs(cos),
        *bs(sin),
        HQ=heads_q,
        HK=heads_k,
        HALF=half,
        BLOCK_T=block_t,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_D=block_d,
        FORWARD=forward,
        LOADS_FIRST=LOADS_FIRST and block_hq >= heads_q and block_hk >= heads_k,
        num_warps=warps,
        # Forward keeps HF's roundings: without this the compiler narrows each rounded product
        # to a bf16 multiply and fuses it with the sum into one bf16 FMA (seen in the PTX for
        # sm_90), one rounding fewer than eager. Backward rounds once anyway: fusion is welcome.
        enable_fp_fusion=not forward,
    )


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cos_sin_grads(dq_out, dk_out, q, k, cos, sin):
    """dc = sum over heads of dy * x, ds = sum over heads of dy * rot(x), in fp32; summed over
    the batch where cos/sin broadcast it. Only when cos/sin require grad (not in HF models)."""
    f = torch.float32
    dcos = (dq_out.to(f) * q.to(f)).sum(1) + (dk_out.to(f) * k.to(f)).sum(1)
    dsin = (dq_out.to(f) * _rotate_half(q.to(f))).sum(1) + (dk_out.to(f) * _rotate_half(k.to(f))).sum(1)
    if cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False):
        q, k = _unit_last_stride(q), _unit_last_stride(k)
        cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
        ctx.cos_sin_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.inplace = inplace = inplace and not ctx.cos_sin_grad  # dcos/dsin need q and k intact
        if inplace:
            q_out, k_out = q, k
        else:
            q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # q's layout where q is dense
        _launch(q, k, cos, sin, q_out, k_out, forward=True, heads_q=q.shape[1], heads_k=k.shape[1])
        if inplace:  # so that autograd raises if anything saved q, k or their base for its backward
            torch.autograd.graph.increment_version((q, k))
        ctx.layouts = (q_out.shape, q_out.stride(), k_out.shape, k_out.stride())
        if ctx.cos_sin_grad:
            ctx.save_for_backward(cos, sin, q, k)
        else:
            ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out: torch.Tensor, dk_out: torch.Tensor):
        cos, sin = ctx.saved_tensors[:2]
        q_shape, q_strides, k_shape, k_strides = ctx.layouts
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = dk = dcos = dsin = None
        if need_q or need_k:
            dq_in, dk_in = _unit_last_stride(dq_out), _unit_last_stride(dk_out)
            if need_q:
                dq = _grad_buffer(dq_in, q_shape, q_strides, ctx.inplace)
            if need_k:
                dk = _grad_buffer(dk_in, k_shape, k_strides, ctx.inplace)
            _launch(
                dq_in,
                dk_in,
                cos,
                sin,
                dq if need_q else dq_in,
                dk if need_k else dk_in,
                forward=False,
                heads_q=q_shape[1] if need_q else 0,
                heads_k=k_shape[1] if need_k else 0,
            )
        if ctx.cos_sin_grad:
            q, k = ctx.saved_tensors[2:]
            dcos, dsin = _cos_sin_grads(dq_out, dk_out, q, k, cos, sin)
            dcos = dcos if ctx.needs_input_grad[2] else None
            dsin = dsin if ctx.needs_input_grad[3] else None
        return dq, dk, dcos, dsin, None


def _grad_buffer(incoming: torch.Tensor, shape, strides, inplace: bool) -> torch.Tensor:
    """dq (dk) in the layout of the outputs, which is q's and k's: the projection's. In place:
    the incoming gradient's own memory, where it has that layout."""
    if inplace and incoming.shape == shape and incoming.stride() == strides:
        return incoming
    return torch.empty_strided(shape, strides, dtype=incoming.dtype, device=incoming.device)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF's apply_rotary_pos_emb (unsqueeze_dim=1) in PyTorch; autograd derives the backward."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_unsupported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors, or None."""
    dtypes = {q.dtype, k.dtype, cos.dtype, sin.dtype}
    if len(dtypes) != 1 or q.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(t.dtype) for t in (q, k, cos, sin))
        return f"unsupported dtypes {names} (the kernel takes one of fp32, bf16, fp16 for all four)"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}: expected (B, H, S, D) and (B or 1, S, D)"
    batch, _, seq_len, dim = q.shape
    if dim % 2:
        return f"head_dim {dim} is odd"
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != dim:
        return f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}"
    if cos.shape[0] not in (1, batch) or cos.shape[1] != seq_len or cos.shape[2] != dim:
        return f"cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)} (expected ({batch} or 1, {seq_len}, {dim}))"
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        return "inputs on different devices"
    return None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k) with HF's cast points, cos/sin of shape
    (B or 1, S, D); Triton where it can run, else the reference. inplace=True lets the kernel
    write the rotation over q and k, and in backward dq over the incoming gradient: only for a
    caller that proves nothing else reads them (the module docstring); the reference never does."""
    if rope_unsupported(q, k, cos, sin) is None and use_triton(q, k, cos, sin):
        return RoPEFunction.apply(q, k, cos, sin, inplace)
    return rope_reference(q, k, cos, sin)
