"""The rank-r products of LoRA, at fp32 accuracy on tensor cores, reading activations as they are.

LoRA's factors are fp32 (PEFT keeps adapters in fp32 for half-precision models) while the
activations they multiply are bf16/fp16. Eager PyTorch makes an fp32 copy of every activation
for these products (x.float() for lora_A, and fp32 (M, N) intermediates for lora_B), which is
most of LoRA's memory traffic. The three ops here read the big operand once in its own dtype.

Accuracy: down and grad feed the LoRA gradients, which PEFT computes as fp32 matmuls, so they
must be as accurate as an fp32 GEMM. With a bf16 activation X (exact on the tensor cores) the
fp32 factor is split into three bf16 parts, p = p0 + p1 2^-8 + p2 2^-16 (24 bits, all of p's
mantissa), and X p = X p0 + (X p1 + X p2 2^-8) 2^-8. Each tensor-core dot covers only one
block of the reduction (64 terms, a fresh accumulator) and the blocks are summed with ordinary
round-to-nearest fp32 adds: the H200's tensor cores do not round their fp32 accumulation to
nearest, so a dot that accumulates over the whole reduction (4096 terms) measured 12x eager's
error for dB (2026-11-29); bounded to 64 terms, that effect stays below fp32 rounding of the
sum. fp16 and fp32 activations use exact fp32 dots (fp16 parts would go subnormal).
up_add's term is added to a half-precision Y: both fp32 factors are split into two bf16/fp16
parts, a ~ a0 + a1 2^-S (S = 8 for bf16, 11 for fp16; the scaling keeps the residual out of the
subnormal range), and the three largest cross terms are kept, far below Y's rounding. An
fp32 Y (fp32 models) uses exact fp32 dots.

    down(X, P, s)       = s X P^T            X (M, K), P (R, K) fp32      -> (M, R) fp32
    up_add(Y, U, V, s)  : Y <- Y + s U V^T   Y (M, N), U (M, R), V (N, R) fp32, in place; with
                          round_first the term is rounded to Y's dtype before the add (PEFT's
                          4-bit path), else added in fp32 and rounded once (its dense path)
    grad(X, U, s)       = s U^T X            X (M, K), U (M, R) fp32      -> (R, K) fp32

Segmented (q, k and v, or gate and up, at once): the stacked axis of X or Y is cut at up to two
points into segments i, each with its own factor and scale; the factors' rank-r columns sit
side by side (U_i = U[:, i r : (i + 1) r]). Per segment the products above are unchanged:

    down:   out[:, i r : (i + 1) r] = s_i X[:, seg_i] P[:, seg_i]^T      (g_i = s_i D_i B_i)
    grad:   out[:, seg_i]           = s_i U_i^T X[:, seg_i]              (dB_i^T = s_i u_i^T D_i)
    up_add: Y[:, seg_i]            += s_i U_i V[seg_i]^T                 (y_i += s_i u_i B_i^T)

so their accuracy is that of the plain products; one launch replaces one per segment.

Traffic: down and grad read X once (M K b bytes) plus the small factors; up_add reads and writes
Y (2 M N b). Both down (over K) and grad (over M) split their reduction across programs until
the grid fills the GPU: each split writes fp32 partials that are summed in a second,
deterministic stage.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import num_programs_for_reduction, use_triton

_SHIFT = {torch.bfloat16: 8, torch.float16: 11}


@triton.jit
def _split2(a, DT: tl.constexpr, SCALE: tl.constexpr):
    """a (fp32) ~ a0 + a1 / SCALE, both parts in dtype DT (16 bits of a for bf16)."""
    a0 = a.to(DT)
    a1 = ((a - a0.to(tl.float32)) * SCALE).to(DT)
    return a0, a1


@triton.jit
def _split3(a, SCALE: tl.constexpr):
    """a (fp32) = a0 + (a1 + a2 / SCALE) / SCALE exactly, three bf16 parts (SCALE = 2^8)."""
    a0 = a.to(tl.bfloat16)
    rest = (a - a0.to(tl.float32)) * SCALE
    a1 = rest.to(tl.bfloat16)
    a2 = ((rest - a1.to(tl.float32)) * SCALE).to(tl.bfloat16)
    return a0, a1, a2


@triton.jit
def _dot_fp32(a, b, SPLIT: tl.constexpr, SPLIT_FIRST: tl.constexpr, SCALE: tl.constexpr):
    """a @ b at fp32 accuracy for one reduction block. With SPLIT, one operand is bf16 (exact
    on the tensor cores) and the other, fp32, is split in three (the first if SPLIT_FIRST);
    else both are widened to fp32 (exact fp32 dots)."""
    # if/else, no early return: Triton compiles what follows a returning branch
    if SPLIT and SPLIT_FIRST:
        a0, a1, a2 = _split3(a, SCALE)
        out = tl.dot(a0, b) + (tl.dot(a1, b) + tl.dot(a2, b) / SCALE) / SCALE
    elif SPLIT:
        b0, b1, b2 = _split3(b, SCALE)
        out = tl.dot(a, b0) + (tl.dot(a, b1) + tl.dot(a, b2) / SCALE) / SCALE
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return out


@triton.jit
def _segment(pos, b1, b2):
    """Which of up to three segments [0, b1), [b1, b2), [b2, ...) the position lies in."""
    return (pos >= b1).to(tl.int32) + (pos >= b2).to(tl.int32)


@triton.jit
def _pick(seg, a0, a1, a2):
    return tl.where(seg == 0, a0, tl.where(seg == 1, a1, a2))


@triton.jit
def _down_kernel(
    X, P, OUT, M, K, R, b1, b2, s0, s1, s2, splits,
    sxm, sxk, spr, spk, sos, som, sor,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """One (BM, R) block of the rows over one split of one segment's reduction range:
    OUT[split][:, seg R : seg R + R] (fp32), scaled by the segment's scale."""
    pid, item = tl.program_id(0), tl.program_id(1)
    seg, split = item // splits, item % splits
    seg_start = _pick(seg, 0, b1, b2)
    seg_end = _pick(seg, b1, b2, K)
    chunk = tl.cdiv(seg_end - seg_start, splits * BK) * BK
    start = seg_start + split * chunk
    end = tl.minimum(seg_end, start + chunk)
    rm = tl.cast(pid, tl.int64) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(start, end, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < end), other=0.0)
        p = tl.load(P + rr[None, :] * spr + rk[:, None] * spk, mask=(rr[None, :] < R) & (rk[:, None] < end), other=0.0)
        acc += _dot_fp32(x, p.to(tl.float32), SPLIT, False, 256.0)  # one block per dot, summed in fp32
    out = OUT + split * sos + rm[:, None] * som + (seg * R + rr[None, :]) * sor
    tl.store(out, acc * _pick(seg, s0, s1, s2), mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _up_add_kernel(
    Y, U, V, M, N, R, b1, b2, s0, s1, s2,
    sym, syn, sum_, sur, svn, svr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
    DT: tl.constexpr, SCALE: tl.constexpr, EXACT: tl.constexpr, ROUND_FIRST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    seg = _segment(pid_n * BN, b1, b2)  # blocks never straddle a segment boundary
    rm = tl.cast(pid_m, tl.int64) * BM + tl.arange(0, BM)
    rn = tl.cast(pid_n, tl.int64) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    u_ptr = U + rm[:, None] * sum_ + (seg * R + rr[None, :]) * sur
    u = tl.load(u_ptr, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    v = tl.load(V + rn[None, :] * svn + rr[:, None] * svr, mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
    u = u.to(tl.float32)
    v = v.to(tl.float32)
    if EXACT:
        term = tl.dot(u, v, input_precision="ieee")
    else:
        u0, u1 = _split2(u, DT, SCALE)
        v0, v1 = _split2(v, DT, SCALE)
        term = tl.dot(u0, v0) + (tl.dot(u0, v1) + tl.dot(u1, v0)) / SCALE
    term = term * _pick(seg, s0, s1, s2)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptr = Y + rm[:, None] * sym + rn[None, :] * syn
    y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    if ROUND_FIRST:
        term = term.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(ptr, (y + term).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(
    X, U, PARTIAL, M, K, R, rows_per_split, b1, b2, s0, s1, s2,
    sxm, sxk, sum_, sur,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    pid_k, split = tl.program_id(0), tl.program_id(1)
    seg = _segment(pid_k * BK, b1, b2)  # blocks never straddle a segment boundary
    rk = tl.cast(pid_k, tl.int64) * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rm = tl.cast(m0, tl.int64) + tl.arange(0, BM)
        inside = rm < tl.minimum(M, start + rows_per_split)
        u_ptr = U + rm[None, :] * sum_ + (seg * R + rr[:, None]) * sur
        ut = tl.load(u_ptr, mask=inside[None, :] & (rr[:, None] < R), other=0.0)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=inside[:, None] & (rk[None, :] < K), other=0.0)
        acc += _dot_fp32(ut.to(tl.float32), x, SPLIT, True, 256.0)  # one block per dot
    out = PARTIAL + split * R * K + rr[:, None] * K + rk[None, :]
    tl.store(out, acc * _pick(seg, s0, s1, s2), mask=(rr[:, None] < R) & (rk[None, :] < K))


def _kind(dtype: torch.dtype) -> tuple:
    """(tl dtype of the split parts, 2^S, exact fp32 dots?) for an activation dtype."""
    if dtype in _SHIFT:
        return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), float(2 ** _SHIFT[dtype]), False
    return tl.float32, 1.0, True


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


Segments = tuple[int, ...]  # the cut points of the stacked axis: () one segment, (b1,) two, (b1, b2) three


def _segments(length: int, bounds: Segments, scale) -> tuple[int, int, tuple[float, float, float], int]:
    """(b1, b2, three scales, number of segments) for the kernels; scale is one float or one per segment."""
    if not bounds and not isinstance(scale, (tuple, list)):  # the plain product (most calls)
        return length, length, (float(scale), 0.0, 0.0), 1
    count = len(bounds) + 1
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * count
    if count > 3 or len(scales) != count or list(bounds) != sorted(bounds) or any(not 0 < b < length for b in bounds):
        raise ValueError(f"segments {bounds} of a length {length} with scales {scales}: up to three, in order")
    cuts = (*bounds, length, length)[:2]
    return cuts[0], cuts[1], (*scales, 0.0, 0.0)[:3], count


def segment_block(bounds: Segments, largest: int) -> int:
    """The largest power-of-two block (at most `largest`, at least 16) that no segment boundary
    cuts, or 0 if there is none (the grouped products then need separate calls)."""
    block = largest
    while block >= 16 and any(b % block for b in bounds):
        block //= 2
    return block if block >= 16 else 0


def down(x: torch.Tensor, p: torch.Tensor, scale=1.0, bounds: Segments = ()) -> torch.Tensor:
    """scale * x @ p.T in fp32: x (M, K) any float dtype, p (R, K) fp32 (any strides).
    With bounds, K is cut into segments and each gets its own product and scale, side by side:
    out[:, i R : (i + 1) R] = scale_i x[:, seg_i] @ p[:, seg_i].T (LoRA's g_i = s_i D_i B_i for
    q, k and v at once, from their stacked gradient)."""
    m, k = x.shape
    r = p.shape[0]
    b1, b2, scales, count = _segments(k, bounds, scale)
    if not use_triton(x, p):
        cuts = [0, *bounds, k]
        parts = [(x[:, a:b].float() @ p[:, a:b].float().t()) * s for a, b, s in zip(cuts, cuts[1:], scales)]
        return torch.cat(parts, dim=1)
    if m == 0 or k == 0:
        return torch.zeros((m, count * r), dtype=torch.float32, device=x.device)
    bm, bk = 64, 64
    m_blocks, k_blocks = triton.cdiv(m, bm), triton.cdiv(k, bk)
    # split the reduction until the grid fills the GPU (4096 rows are only 64 row blocks);
    # the splits' fp32 partials are summed in a second, deterministic pass
    splits = max(1, min(triton.cdiv(k_blocks, count), num_programs_for_reduction(x.device) // (m_blocks * count)))
    out = torch.empty((splits, m, count * r), dtype=torch.float32, device=x.device)
    _down_kernel[(m_blocks, count * splits)](
        x, p, out, m, k, r, b1, b2, *scales, splits, *x.stride(), *p.stride(), *out.stride(),
        BM=bm, BK=bk, BR=_block_r(r), SPLIT=x.dtype == torch.bfloat16,
    )  # fmt: skip
    return out[0] if splits == 1 else out.sum(0)


def up_add_(
    y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale=1.0, round_first: bool = False, bounds: Segments = ()
):
    """y += scale * u @ v.T in place: y (M, N), u (M, R) and v (N, R) fp32 (any strides). With
    bounds, N is cut into segments: y[:, seg_i] += scale_i u[:, i R : (i + 1) R] @ v[seg_i].T
    (q, k and v's LoRA terms into their stacked output at once); no block may straddle a cut."""
    m, n = y.shape
    r = v.shape[1]
    b1, b2, scales, count = _segments(n, bounds, scale)
    if not use_triton(y, u, v):
        cuts = [0, *bounds, n]
        for i, (a, b, s) in enumerate(zip(cuts, cuts[1:], scales)):
            term = (u[:, i * r : (i + 1) * r].float() @ v[a:b].float().t()) * s
            if round_first:
                term = term.to(y.dtype)
            y[:, a:b] = (y[:, a:b].float() + term.float()).to(y.dtype)
        return y
    dt, sc, exact = _kind(y.dtype)
    bm, bn = 64, segment_block(bounds, 128)
    if not bn:
        raise ValueError(f"segment bounds {bounds} are not multiples of 16")
    _up_add_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        y, u, v, m, n, r, b1, b2, *scales, *y.stride(), *u.stride(), *v.stride(),
        BM=bm, BN=bn, BR=_block_r(r), DT=dt, SCALE=sc, EXACT=exact, ROUND_FIRST=round_first,
    )  # fmt: skip
    return y


def grad(x: torch.Tensor, u: torch.Tensor, scale=1.0, bounds: Segments = (), rank: int | None = None) -> torch.Tensor:
    """scale * u.T @ x in fp32: x (M, K) any float dtype, u (M, R) fp32 -> (R, K). With bounds,
    K is cut into segments and u holds one rank-`rank` factor per segment, side by side:
    out[:, seg_i] = scale_i u[:, i r : (i + 1) r].T @ x[:, seg_i] (LoRA's dB_i^T for q, k and
    v at once); no block may straddle a cut."""
    m, k = x.shape
    r = rank if bounds else u.shape[1]
    b1, b2, scales, count = _segments(k, bounds, scale)
    if not use_triton(x, u):
        cuts = [0, *bounds, k]
        parts = [
            (u[:, i * r : (i + 1) * r].float().t() @ x[:, a:b].float()) * s
            for i, (a, b, s) in enumerate(zip(cuts, cuts[1:], scales))
        ]
        return torch.cat(parts, dim=1)
    if m == 0:
        return torch.zeros((r, k), dtype=torch.float32, device=x.device)
    bm, bk = 64, segment_block(bounds, 64)
    if not bk:
        raise ValueError(f"segment bounds {bounds} are not multiples of 16")
    k_blocks = triton.cdiv(k, bk)
    target = num_programs_for_reduction(x.device)
    splits = max(1, min(triton.cdiv(m, bm), target // k_blocks))
    rows = triton.cdiv(triton.cdiv(m, splits), bm) * bm
    splits = triton.cdiv(m, rows)
    partial = torch.empty((splits, r, k), dtype=torch.float32, device=x.device)
    _grad_kernel[(k_blocks, splits)](
        x, u, partial, m, k, r, rows, b1, b2, *scales, *x.stride(), *u.stride(),
        BM=bm, BK=bk, BR=_block_r(r), SPLIT=x.dtype == torch.bfloat16,
    )  # fmt: skip
    return partial.sum(0) if splits > 1 else partial[0]  # the scales are applied in the kernel
