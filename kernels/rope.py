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
token, so packed sequences with per-token positions work. A program takes BLOCK_T tokens and
one group of their heads (HEAD_GROUPS groups, 1 by default: all q heads and all k heads):
cos/sin are read once per token and group and kept in registers, each head row is read as two
contiguous half-rows (16-byte vectors). With LOADS_FIRST the program's q and k head rows are
one tile each and all loaded before the first store; else BLOCK_H heads at a time. Loads and
stores go unmasked where the tiles divide the shape (Llama's). The launch settings below the
kernels change the schedule only: every choice computes the same bits.

Out of place by default: in place would modify the projection outputs through a view, and
autograd would then record a CopySlices node with its own copy in backward (mark_dirty); it
is also safe only where the graph proves q/k have no other user. Out of place costs one
q/k-sized buffer whose inputs die right after (the allocator reuses them), and no extra
traffic. The outputs take q's and k's memory layout (empty_like; HF's transposed views are
dense), and dq/dk are written in that layout too, so the transpose and view backward that
follow (into the projections) are free views, not copies.

rope(..., inplace=True) is the opt-in for a caller that has that proof (Liger's Function
always works in place): the kernel writes q_embed over q and k_embed over k, returns them
(autograd wraps them as views of its inputs), and bumps their version counter instead of
mark_dirty, so autograd raises if anything saved q, k or their base (the projection output)
for its backward rather than reading rotated values. Backward then writes dq over the
incoming dq_embed where that has q's layout (else into a new buffer), which assumes autograd
hands that gradient to nobody else (true when q_embed's only user is attention). With cos/sin
requiring grad it stays out of place (their gradients need q and k).

Memory traffic (T = B S tokens, b bytes per element, T_c cos/sin rows): forward reads q and
k and writes two outputs of the same size, plus cos and sin once (from DRAM; the other head
groups' reads of them hit the L2): 2 T (Hq + Hk) D b + 2 T_c D b. Backward moves the same
bytes (dq_out, dk_out in; dq, dk out; cos, sin).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _load_halves(X, off, mask, HALF: tl.constexpr, MASKED: tl.constexpr):
    """The two half-rows [x1, x2] at element offsets `off` (of the first half), in fp32."""
    if MASKED:
        x1 = tl.load(X + off, mask=mask, other=0.0)
        x2 = tl.load(X + off + HALF, mask=mask, other=0.0)
    else:
        x1 = tl.load(X + off)
        x2 = tl.load(X + off + HALF)
    return x1.to(tl.float32), x2.to(tl.float32)


@triton.jit
def _rotate_store(
    Y, off, mask, x1, x2, c1, c2, s1, s2, HALF: tl.constexpr, MASKED: tl.constexpr, FORWARD: tl.constexpr
):
    if FORWARD:  # HF's cast points: each product rounded to the output dtype, then the sum
        y1 = (x1 * c1).to(Y.dtype.element_ty).to(tl.float32) - (x2 * s1).to(Y.dtype.element_ty).to(tl.float32)
        y2 = (x2 * c2).to(Y.dtype.element_ty).to(tl.float32) + (x1 * s2).to(Y.dtype.element_ty).to(tl.float32)
    else:  # the transpose rotation, fp32 throughout: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    if MASKED:
        tl.store(Y + off, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + off + HALF, y2.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.store(Y + off, y1.to(Y.dtype.element_ty))
        tl.store(Y + off + HALF, y2.to(Y.dtype.element_ty))


@triton.jit
def _head_tile(tok, stride_h, t_mask, h_first, local, N_HEADS: tl.constexpr, GROUP_HEADS: tl.constexpr,
               HALF: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """Offsets (tokens x heads x half-row) of the heads h_first + local, and their mask."""
    d = tl.arange(0, BLOCK_D)[None, None, :]
    h = h_first + local
    mask = t_mask[:, None, None] & ((local < GROUP_HEADS) & (h < N_HEADS))[None, :, None] & (d < HALF)
    return tok[:, None, None] + (h.to(tl.int64) * stride_h)[None, :, None] + d, mask


@triton.jit
def _rotate_heads(X, Y, x_tok, y_tok, sx_h, sy_h, t_mask, c1, c2, s1, s2, h_first,
                  N_HEADS: tl.constexpr, GROUP_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, FORWARD: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """Rotate the GROUP_HEADS head rows from h_first of BLOCK_T tokens, BLOCK_H heads at a time
    (each tile's loads, then its stores)."""
    for h0 in range(0, GROUP_HEADS, BLOCK_H):
        local = h0 + tl.arange(0, BLOCK_H)
        x_off, mask = _head_tile(x_tok, sx_h, t_mask, h_first, local, N_HEADS, GROUP_HEADS, HALF, BLOCK_D)
        y_off, _ = _head_tile(y_tok, sy_h, t_mask, h_first, local, N_HEADS, GROUP_HEADS, HALF, BLOCK_D)
        x1, x2 = _load_halves(X, x_off, mask, HALF, MASKED)
        _rotate_store(Y, y_off, mask, x1, x2, c1, c2, s1, s2, HALF, MASKED, FORWARD)


@triton.jit
def _rope_kernel(
    Q,
    K,
    COS,
    SIN,
    QO,
    KO,
    tokens,
    seq_len,
    sq_b,
    sq_s,
    sq_h,
    sk_b,
    sk_s,
    sk_h,
    sqo_b,
    sqo_s,
    sqo_h,
    sko_b,
    sko_s,
    sko_h,
    sc_b,
    sc_s,
    ss_b,
    ss_s,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HQ_G: tl.constexpr,
    HK_G: tl.constexpr,
    GROUPS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FORWARD: tl.constexpr,
    LOADS_FIRST: tl.constexpr,
    MASK_T: tl.constexpr,
    MASK_Q: tl.constexpr,
    MASK_K: tl.constexpr,
):
    """Program p: tokens (p // GROUPS) * BLOCK_T + [0, BLOCK_T), head group p % GROUPS (HQ_G q
    heads and HK_G k heads from group * HQ_G, group * HK_G). MASK_*: some lane of the tiles is
    out of range (else the loads and stores go unmasked)."""
    pid = tl.program_id(0)
    group = pid % GROUPS
    t = (pid // GROUPS) * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: fewer than 2^31 tokens
    t_mask = t < tokens
    b = (t // seq_len).to(tl.int64)
    s = (t % seq_len).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    cs_mask = t_mask[:, None] & (d < HALF)
    c1, c2 = _load_halves(COS, (b * sc_b + s * sc_s)[:, None] + d, cs_mask, HALF, MASK_T)
    s1, s2 = _load_halves(SIN, (b * ss_b + s * ss_s)[:, None] + d, cs_mask, HALF, MASK_T)
    c1, c2, s1, s2 = c1[:, None, :], c2[:, None, :], s1[:, None, :], s2[:, None, :]
    q_tok, qo_tok = b * sq_b + s * sq_s, b * sqo_b + s * sqo_s
    k_tok, ko_tok = b * sk_b + s * sk_s, b * sko_b + s * sko_s
    if LOADS_FIRST:  # one tile per tensor holds all the group's heads: every load before any store
        lq, lk = tl.arange(0, BLOCK_HQ), tl.arange(0, BLOCK_HK)
        if HQ_G > 0:
            q_off, q_mask = _head_tile(q_tok, sq_h, t_mask, group * HQ_G, lq, HQ, HQ_G, HALF, BLOCK_D)
            q1, q2 = _load_halves(Q, q_off, q_mask, HALF, MASK_Q)
        if HK_G > 0:
            k_off, k_mask = _head_tile(k_tok, sk_h, t_mask, group * HK_G, lk, HK, HK_G, HALF, BLOCK_D)
            k1, k2 = _load_halves(K, k_off, k_mask, HALF, MASK_K)
        if HQ_G > 0:
            qo_off, _ = _head_tile(qo_tok, sqo_h, t_mask, group * HQ_G, lq, HQ, HQ_G, HALF, BLOCK_D)
            _rotate_store(QO, qo_off, q_mask, q1, q2, c1, c2, s1, s2, HALF, MASK_Q, FORWARD)
        if HK_G > 0:
            ko_off, _ = _head_tile(ko_tok, sko_h, t_mask, group * HK_G, lk, HK, HK_G, HALF, BLOCK_D)
            _rotate_store(KO, ko_off, k_mask, k1, k2, c1, c2, s1, s2, HALF, MASK_K, FORWARD)
    else:
        _rotate_heads(
            Q, QO, q_tok, qo_tok, sq_h, sqo_h, t_mask, c1, c2, s1, s2, group * HQ_G,
            HQ, HQ_G, HALF, BLOCK_HQ, BLOCK_D, FORWARD, MASK_Q,
        )  # fmt: skip
        _rotate_heads(
            K, KO, k_tok, ko_tok, sk_h, sko_h, t_mask, c1, c2, s1, s2, group * HK_G,
            HK, HK_G, HALF, BLOCK_HK, BLOCK_D, FORWARD, MASK_K,
        )  # fmt: skip


# Launch configuration, module-level so that benchmarks/bench_elementwise.py --sweep can time
# alternatives without code edits (every choice computes the same bits).
#
# TILE_*: elements of one half-row tile (tokens x heads x head_dim/2) a program holds per
# tensor; short rows (small models) take several tokens. Measured on an H200 at Llama-8B shapes
# (16384 tokens, CUDA graph replays): forward 84.7 us with one token per program (2048),
# 85.4 with two; backward 89.5 us with one, 85.0 with two (4096), 3.9 TB/s of a 4.25 TB/s copy.
TILE_FORWARD = 2048
TILE_BACKWARD = 4096
# Warps per program; None: one per 256 elements of the larger (q or k) tile, 1 to 8.
WARPS_FORWARD: int | None = None
WARPS_BACKWARD: int | None = None
# Programs per token block, each taking a contiguous group of the q heads and of the k heads
# (a power of 2; 8 with 32 q / 8 k heads: one kv head and its 4 q heads per program).
HEAD_GROUPS = 1
# True: a program's tile spans all its group's heads (the tile size then sets the tokens per
# program only) and it issues every q and k load before its first store; False: BLOCK_H heads
# at a time, q's tiles then k's, each tile's stores before the next tile's loads.
LOADS_FIRST = False
# ... where a group's heads of one token fit this many elements per half-row tile (registers);
# past it the group is taken BLOCK_H heads at a time (raise HEAD_GROUPS for such models).
LOADS_FIRST_MAX_TILE = 8192


def _launch_config(tokens: int, half: int, heads_q: int, heads_k: int, forward: bool) -> dict:
    """The kernel's constexprs, num_warps and program count under the module's settings."""
    tile = TILE_FORWARD if forward else TILE_BACKWARD
    warps = WARPS_FORWARD if forward else WARPS_BACKWARD
    groups = max(1, min(triton.next_power_of_2(max(HEAD_GROUPS, 1)), triton.next_power_of_2(max(heads_q, heads_k, 1))))
    hq_g, hk_g = triton.cdiv(heads_q, groups), triton.cdiv(heads_k, groups)
    block_d = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(max(hq_g, 1))
    block_hk = triton.next_power_of_2(max(hk_g, 1))
    loads_first = LOADS_FIRST and max(block_hq, block_hk) * block_d <= LOADS_FIRST_MAX_TILE
    if not loads_first:
        block_hq = max(1, min(block_hq, tile // block_d))
        block_hk = max(1, min(block_hk, tile // block_d))
    block_t = max(1, min(64, tile // (max(block_hq, block_hk) * block_d)))
    if warps is None:
        warps = max(1, min(8, block_t * max(block_hq, block_hk) * block_d // 256))
    mask_t = tokens % block_t != 0 or half != block_d
    return dict(
        HQ=heads_q,
        HK=heads_k,
        HQ_G=hq_g,
        HK_G=hk_g,
        GROUPS=groups,
        HALF=half,
        BLOCK_T=block_t,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_D=block_d,
        FORWARD=forward,
        LOADS_FIRST=loads_first,
        MASK_T=mask_t,
        MASK_Q=mask_t or hq_g % block_hq != 0 or heads_q % groups != 0,
        MASK_K=mask_t or hk_g % block_hk != 0 or heads_k % groups != 0,
        num_warps=warps,
        programs=triton.cdiv(tokens, block_t) * groups,
    )


def _launch(q, k, cos, sin, q_out, k_out, *, forward: bool, heads_q: int, heads_k: int) -> None:
    """q_out, k_out <- the rotation (forward) or its transpose (backward) of q, k; q_out may be
    q itself and k_out k (each element is read before it is written, by the same program)."""
    batch, _, seq_len, dim = q.shape
    tokens = batch * seq_len
    if tokens == 0:
        return
    config = _launch_config(tokens, dim // 2, heads_q, heads_k, forward)
    programs = config.pop("programs")

    def bsh(t):  # strides of batch, sequence, head (B, H, S, D layout)
        return t.stride(0), t.stride(2), t.stride(1)

    def bs(t):  # cos/sin: a batch of 1 broadcasts
        return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)

    _rope_kernel[(programs,)](
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
        **config,
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
        if inplace:  # autograd is told through the version counter (see the module docstring)
            q_out, k_out = q, k
        else:
            q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # q's layout where q is dense
        _launch(q, k, cos, sin, q_out, k_out, forward=True, heads_q=q.shape[1], heads_k=k.shape[1])
        if inplace:
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

            def grad_buffer(incoming, shape, strides):
                """dq (dk) in the layout of the outputs, which is q's and k's: the projection's.
                In place: the incoming gradient's own memory where it has that layout."""
                if ctx.inplace and incoming.shape == shape and incoming.stride() == strides:
                    return incoming
                return torch.empty_strided(shape, strides, dtype=incoming.dtype, device=incoming.device)

            if need_q:
                dq = grad_buffer(dq_in, q_shape, q_strides)
            if need_k:
                dk = grad_buffer(dk_in, k_shape, k_strides)
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
    overwrite q and k (and, in backward, the incoming gradients): only where nothing else reads
    them (see the module docstring); the reference path never does."""
    if rope_unsupported(q, k, cos, sin) is None and use_triton(q, k, cos, sin):
        return RoPEFunction.apply(q, k, cos, sin, inplace)
    return rope_reference(q, k, cos, sin)
