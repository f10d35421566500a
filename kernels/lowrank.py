"""The rank-r products of LoRA, at fp32 accuracy on tensor cores, reading activations as they are.

LoRA's factors are fp32 (PEFT keeps adapters in fp32 for half-precision models) while the
activations they multiply are bf16/fp16. Eager PyTorch makes an fp32 copy of every activation
for these products (x.float() for lora_A, and fp32 (M, N) intermediates for lora_B), which is
most of LoRA's memory traffic. The three ops here read the big operand once in its own dtype.

Accuracy: down and grad feed the LoRA gradients, which PEFT computes as fp32 matmuls, so they
must be as accurate as an fp32 GEMM. With a bf16 activation X (exact on the tensor cores) the
fp32 factor is split into three bf16 parts, p = p0 + p1 2^-8 + p2 2^-16 (24 bits, all of p's
mantissa), and X p = X p0 + (X p1 + X p2 2^-8) 2^-8. Each tensor-core dot covers only one
block of the reduction (at most 64 terms, a fresh accumulator) and the blocks are summed with
ordinary round-to-nearest fp32 adds: the H200's tensor cores do not round their fp32
accumulation to nearest, so a dot that accumulates over the whole reduction (4096 terms)
measured 12x eager's error for dB (2026-11-29); bounded to 64 terms, that effect stays below
fp32 rounding of the sum. Triton folds `acc += tl.dot(a, b)` into one accumulation when the
dot starts from a constant zero, so the fresh accumulators start from a zero passed at run time.
The parts meet X in one of two ways (CONFIGS' parts):
  stacked (ranks up to 32): one dot against the parts side by side, [p0 | p1 | p2 | 0], whose
    columns are each part's block sum; each part's sums are accumulated apart (fp32) and
    combined once, c0 + (c1 + c2 2^-8) 2^-8. One tensor-core op per block, with the parts in
    the wide dimension: down is X (BM, BK) @ (BK, 4 R), grad X^T (BK, BM) @ (BM, 4 R).
  chained (ranks 33-64): three dots into one fresh accumulator per block, p2's first, unscaled
    parts (p = p0 + p1 + p2 exactly while |p| >= 2^-100), summed into the result per block.
Either way every part's product is exact and every sum an fp32 one, as before.
fp16 and fp32 activations use exact fp32 dots (fp16 parts would go subnormal).
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
the grid has about programs_per_sm programs per SM: each split writes fp32 partials that are
summed in a second, deterministic stage (a torch sum). grad_and_down computes grad's and down's products of LoRA's
backward from one read of the gradient D (their two calls read it twice).

Launch parameters live in CONFIGS (and per call, config=...); plan() says what a call will run.
benchmarks/sweep_lowrank.py times candidates against the defaults and eager PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import _multiprocessors, num_programs_for_reduction, use_triton

_SHIFT = {torch.bfloat16: 8, torch.float16: 11}

# How the bf16 parts of an fp32 factor meet a bf16 activation on the tensor cores (module docstring)
_EXACT = tl.constexpr(0)  # no parts: exact fp32 dots (fp16 and fp32 activations)
_CHAINED = tl.constexpr(1)  # three dots into one fresh accumulator per block
_STACKED = tl.constexpr(2)  # one dot of the parts stacked side by side, each part summed apart

# down over a reduction this long (x A^T of down_proj, K = 14336) runs its parts chained: the
# H200 sweep of run 1 (RESULTS.md, fifth session) measured 48 against 59.5 us stacked at 4096
# tokens and 140 against 200.7 at 16384, both within the accuracy bound.
LONG_K = 8192

# Tiles and launch of each op, overridable per call (config=...) or here (the sweep,
# benchmarks/sweep_lowrank.py, times candidates through the former). programs_per_sm sets how far
# down and grad split their reduction: until the grid has about that many programs per SM.
# parts: "stacked", "chained" or "auto" (stacked up to rank 32: a stacked tile at most 128 wide).
# num_warps None: 4 while the accumulator has at most 8192 entries (64 registers a thread), else 8.
# rank64: what changes for ranks 33-64 (a 64-wide factor tile: q|k|v's merged 48); exact: for
# fp16 and fp32 activations (exact fp32 dots on the CUDA cores: the tiles they had before).
CONFIGS: dict[str, dict] = {
    "down": dict(
        block_m=128,
        block_k=64,
        num_warps=None,
        num_stages=4,
        programs_per_sm=2.0,
        parts="auto",
        rank64=dict(num_warps=8, num_stages=3),
        exact=dict(block_m=64, num_warps=4, num_stages=3, programs_per_sm=4.0),
    ),
    "grad": dict(
        block_m=64,
        block_k=128,
        num_warps=None,
        num_stages=3,
        programs_per_sm=2.0,
        parts="auto",
        exact=dict(block_k=64, num_warps=4, programs_per_sm=4.0),
    ),
    "up_add": dict(block_m=64, block_n=128, num_warps=4),
    # a program takes sub blocks of block_k columns (a dot each, for both products) over its rows
    "grad_and_down": dict(block_m=64, block_k=64, sub=4, num_warps=None, num_stages=3, programs_per_sm=2.0),
}
# The tiling down and grad had up to commit 9f0f2e5 (64 x 64 tiles, 4 programs per SM, chained
# parts; the sweep's "legacy" rows); up_add and grad_and_down have none older than CONFIGS'.
LEGACY: dict[str, dict] = {
    op: dict(block_m=64, block_k=64, num_warps=4, num_stages=3, programs_per_sm=4.0, parts="chained")
    for op in ("down", "grad")
} | {"up_add": dict(CONFIGS["up_add"]), "grad_and_down": dict(CONFIGS["grad_and_down"])}
MAX_TERMS = 64  # reduction terms one tensor-core dot may cover (block_k of down, block_m of grad)


@triton.jit
def _split2(a, DT: tl.constexpr, SCALE: tl.constexpr):
    """a (fp32) ~ a0 + a1 / SCALE, both parts in dtype DT (16 bits of a for bf16)."""
    a0 = a.to(DT)
    a1 = ((a - a0.to(tl.float32)) * SCALE).to(DT)
    return a0, a1


@triton.jit
def _split3(a):
    """a (fp32) = a0 + (a1 + a2 2^-8) 2^-8 exactly, three bf16 parts."""
    a0 = a.to(tl.bfloat16)
    rest = (a - a0.to(tl.float32)) * 256.0
    a1 = rest.to(tl.bfloat16)
    a2 = ((rest - a1.to(tl.float32)) * 256.0).to(tl.bfloat16)
    return a0, a1, a2


@triton.jit
def _split3_unscaled(a):
    """a (fp32) = a0 + a1 + a2, three bf16 parts, each the rounding of what the others leave
    (exact while the last part is a normal bf16: |a| >= 2^-100)."""
    a0 = a.to(tl.bfloat16)
    rest = a - a0.to(tl.float32)
    a1 = rest.to(tl.bfloat16)
    a2 = (rest - a1.to(tl.float32)).to(tl.bfloat16)
    return a0, a1, a2


@triton.jit
def _combine(c0, c1, c2):
    """The value of the parts' products, from their sums: c0 + (c1 + c2 2^-8) 2^-8."""
    return c0 + (c1 + c2 * 0.00390625) * 0.00390625


@triton.jit
def _stack(a0, a1, a2):
    """[a0 | a1 | a2 | 0]: equal (n, BR) tiles side by side, (n, 4 BR)."""
    j = tl.join(tl.join(a0, a1), tl.join(a2, tl.zeros_like(a2)))  # [i, r, jj, ii]: part 2 ii + jj
    return tl.reshape(tl.permute(j, (0, 3, 2, 1)), (a0.shape[0], 4 * a0.shape[1]))


@triton.jit
def _unstack(acc, BR: tl.constexpr):
    """_combine of the parts' sums (n, 4 BR), side by side as _stack puts them -> (n, BR). Each
    part is taken out by a sum over one nonzero entry, which is exact; the part's columns of a
    thread's accumulator are in its own registers, so this is a few adds."""
    a3 = tl.reshape(acc, (acc.shape[0], 4, BR))
    part = tl.arange(0, 4)[None, :, None]
    c0 = tl.sum(tl.where(part == 0, a3, 0.0), axis=1)
    c1 = tl.sum(tl.where(part == 1, a3, 0.0), axis=1)
    c2 = tl.sum(tl.where(part == 2, a3, 0.0), axis=1)
    return _combine(c0, c1, c2)


@triton.jit
def _segment(pos, b1, b2):
    """Which of up to three segments [0, b1), [b1, b2), [b2, ...) the position lies in."""
    return (pos >= b1).to(tl.int32) + (pos >= b2).to(tl.int32)


@triton.jit
def _pick(seg, a0, a1, a2):
    return tl.where(seg == 0, a0, tl.where(seg == 1, a1, a2))


@triton.jit
def _down_kernel(
    X, P, PARTIAL, M, K, R, b1, b2, s0, s1, s2, zero, splits, chunk,
    sxm, sxk, spr, spk, sos, som, sor,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PARTS: tl.constexpr,
):  # fmt: skip
    """One (BM, R) block of the rows over one chunk of one segment's reduction range:
    PARTIAL[split][:, seg R : seg R + R] (fp32), scaled by the segment's scale. Chunks have one
    length in every segment (a shorter segment leaves its last splits empty: they write zeros)."""
    pid, item = tl.program_id(0), tl.program_id(1)
    seg, split = item // splits, item % splits
    seg_start = _pick(seg, 0, b1, b2)
    seg_end = _pick(seg, b1, b2, K)
    start = seg_start + split * chunk
    end = tl.minimum(seg_end, start + chunk)
    rm = tl.cast(pid, tl.int64) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    if PARTS == _STACKED:
        acc = tl.zeros((BM, 4 * BR), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BR), dtype=tl.float32)
    # a zero Triton cannot see: a dot that starts from a constant zero and is added to acc
    # becomes one tensor-core accumulation over the whole reduction (the error this avoids)
    fresh = tl.full(acc.shape, zero, tl.float32)
    for k0 in range(start, end, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < end), other=0.0)
        p = tl.load(P + rr[None, :] * spr + rk[:, None] * spk, mask=(rr[None, :] < R) & (rk[:, None] < end), other=0.0)
        p = p.to(tl.float32)
        if PARTS == _STACKED:  # (BM, BK) @ (BK, 4 BR): each part's block sum, summed apart
            p0, p1, p2 = _split3(p)
            acc += tl.dot(x, _stack(p0, p1, p2), fresh)
        elif PARTS == _CHAINED:  # the three parts' dots into one accumulator, fresh per block
            p0, p1, p2 = _split3_unscaled(p)
            acc += tl.dot(x, p0, tl.dot(x, p1, tl.dot(x, p2)))
        else:
            acc += tl.dot(x.to(tl.float32), p, input_precision="ieee")
    if PARTS == _STACKED:
        out = _unstack(acc, BR)
    else:
        out = acc
    offsets = rm[:, None] * som + (seg * R + rr[None, :]) * sor
    mask = (rm[:, None] < M) & (rr[None, :] < R)
    tl.store(PARTIAL + split * sos + offsets, out * _pick(seg, s0, s1, s2), mask=mask)


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
    X, U, PARTIAL, M, K, R, rows_per_split, b1, b2, s0, s1, s2, zero,
    sxm, sxk, sum_, sur, sor, sok,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PARTS: tl.constexpr,
):  # fmt: skip
    """PARTIAL[split][:, block] = s U[rows]^T X[rows, block] (fp32) for one BK block of columns
    (inside one segment) over one split of the rows; an (R, K) result stored with strides
    (sor, sok) (K, 1, or 1, R for its transpose's layout)."""
    pid_k, split = tl.program_id(0), tl.program_id(1)
    seg = _segment(pid_k * BK, b1, b2)  # blocks never straddle a segment boundary
    rk = tl.cast(pid_k, tl.int64) * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    start = split * rows_per_split
    stop = tl.minimum(M, start + rows_per_split)
    scale = _pick(seg, s0, s1, s2)
    if PARTS == _STACKED:  # X^T (BK, BM) @ [u0 | u1 | u2 | 0] (BM, 4 BR): the parts' sums in registers
        acc = tl.zeros((BK, 4 * BR), dtype=tl.float32)
        fresh = tl.full(acc.shape, zero, tl.float32)  # as in _down_kernel
        for m0 in range(start, stop, BM):
            rm = tl.cast(m0, tl.int64) + tl.arange(0, BM)
            inside = rm < stop
            u_ptr = U + rm[:, None] * sum_ + (seg * R + rr[None, :]) * sur
            u = tl.load(u_ptr, mask=inside[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=inside[:, None] & (rk[None, :] < K), other=0.0)
            u0, u1, u2 = _split3(u)
            acc += tl.dot(tl.trans(x), _stack(u0, u1, u2), fresh)
        offsets = rr[None, :] * sor + rk[:, None] * sok
        mask = (rr[None, :] < R) & (rk[:, None] < K)
        tl.store(PARTIAL + split * R * K + offsets, _unstack(acc, BR) * scale, mask=mask)
    else:  # U^T (BR, BM) @ X (BM, BK)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for m0 in range(start, stop, BM):
            rm = tl.cast(m0, tl.int64) + tl.arange(0, BM)
            inside = rm < stop
            u_ptr = U + rm[None, :] * sum_ + (seg * R + rr[:, None]) * sur
            ut = tl.load(u_ptr, mask=inside[None, :] & (rr[:, None] < R), other=0.0).to(tl.float32)
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=inside[:, None] & (rk[None, :] < K), other=0.0)
            if PARTS == _CHAINED:  # the three parts' dots into one accumulator, fresh per block
                u0, u1, u2 = _split3_unscaled(ut)
                acc += tl.dot(u0, x, tl.dot(u1, x, tl.dot(u2, x)))
            else:
                acc += tl.dot(ut, x.to(tl.float32), input_precision="ieee")
        offsets = rr[:, None] * sor + rk[None, :] * sok
        mask = (rr[:, None] < R) & (rk[None, :] < K)
        tl.store(PARTIAL + split * R * K + offsets, acc * scale, mask=mask)


@triton.jit
def _factor_parts(BT, rk, rr, R, N, sbr, sbn):
    """[b0 | b1 | b2 | 0] (BK, 4 BR) of the fp32 factor's rows rk (BT is its transpose, (R, N))."""
    b = tl.load(BT + rr[None, :] * sbr + rk[:, None] * sbn, mask=(rr[None, :] < R) & (rk[:, None] < N), other=0.0)
    b0, b1, b2 = _split3(b.to(tl.float32))
    return _stack(b0, b1, b2)


@triton.jit
def _grad_down_kernel(
    D, U, BT, PARTIAL, GPART, M, N, R, rows_per_split, b1, b2, s0, s1, s2, zero,
    sdm, sdn, sum_, sur, sbr, sbn,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """_grad_kernel (stacked) and _down_kernel (stacked) over the same tiles of D: one program
    takes SUB blocks of BK columns (inside one segment) over one split of the rows; it writes
    PARTIAL[split][:, its columns] as _grad_kernel does, and for each block of rows its columns'
    share of s D B, GPART[pid_k][rows] (BM, R)."""
    pid_k, split = tl.program_id(0), tl.program_id(1)
    n0 = pid_k * (SUB * BK)
    seg = _segment(n0, b1, b2)  # programs never straddle a segment boundary
    scale = _pick(seg, s0, s1, s2)
    rr = tl.arange(0, BR)
    rk0 = tl.cast(n0, tl.int64) + tl.arange(0, BK)
    rk1 = rk0 + BK
    rk2 = rk0 + 2 * BK
    rk3 = rk0 + 3 * BK
    bp0 = _factor_parts(BT, rk0, rr, R, N, sbr, sbn)  # the same for every block of rows
    acc0 = tl.zeros((BK, 4 * BR), dtype=tl.float32)
    acc1 = tl.zeros((BK, 4 * BR), dtype=tl.float32)
    acc2 = tl.zeros((BK, 4 * BR), dtype=tl.float32)
    acc3 = tl.zeros((BK, 4 * BR), dtype=tl.float32)
    if SUB > 1:
        bp1 = _factor_parts(BT, rk1, rr, R, N, sbr, sbn)
    if SUB > 2:
        bp2 = _factor_parts(BT, rk2, rr, R, N, sbr, sbn)
        bp3 = _factor_parts(BT, rk3, rr, R, N, sbr, sbn)
    fresh = tl.full((BK, 4 * BR), zero, tl.float32)  # as in _down_kernel
    fresh_g = tl.full((BM, 4 * BR), zero, tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(M, start + rows_per_split)
    for m0 in range(start, stop, BM):
        rm = tl.cast(m0, tl.int64) + tl.arange(0, BM)
        inside = rm < stop
        u_ptr = U + rm[:, None] * sum_ + (seg * R + rr[None, :]) * sur
        u = tl.load(u_ptr, mask=inside[:, None] & (rr[None, :] < R), other=0.0)
        u0, u1, u2 = _split3(u.to(tl.float32))
        up = _stack(u0, u1, u2)
        d_ptr = D + rm[:, None] * sdm
        d = tl.load(d_ptr + rk0[None, :] * sdn, mask=inside[:, None] & (rk0[None, :] < N), other=0.0)
        acc0 += tl.dot(tl.trans(d), up, fresh)
        g = tl.dot(d, bp0, fresh_g)
        if SUB > 1:
            d = tl.load(d_ptr + rk1[None, :] * sdn, mask=inside[:, None] & (rk1[None, :] < N), other=0.0)
            acc1 += tl.dot(tl.trans(d), up, fresh)
            g += tl.dot(d, bp1, fresh_g)
        if SUB > 2:
            d = tl.load(d_ptr + rk2[None, :] * sdn, mask=inside[:, None] & (rk2[None, :] < N), other=0.0)
            acc2 += tl.dot(tl.trans(d), up, fresh)
            g += tl.dot(d, bp2, fresh_g)
            d = tl.load(d_ptr + rk3[None, :] * sdn, mask=inside[:, None] & (rk3[None, :] < N), other=0.0)
            acc3 += tl.dot(tl.trans(d), up, fresh)
            g += tl.dot(d, bp3, fresh_g)
        g_ptr = GPART + pid_k * M * R + rm[:, None] * R + rr[None, :]
        tl.store(g_ptr, _unstack(g, BR) * scale, mask=inside[:, None] & (rr[None, :] < R))
    out = PARTIAL + split * R * N + rr[None, :] * N
    tl.store(out + rk0[:, None], _unstack(acc0, BR) * scale, mask=(rr[None, :] < R) & (rk0[:, None] < N))
    if SUB > 1:
        tl.store(out + rk1[:, None], _unstack(acc1, BR) * scale, mask=(rr[None, :] < R) & (rk1[:, None] < N))
    if SUB > 2:
        tl.store(out + rk2[:, None], _unstack(acc2, BR) * scale, mask=(rr[None, :] < R) & (rk2[:, None] < N))
        tl.store(out + rk3[:, None], _unstack(acc3, BR) * scale, mask=(rr[None, :] < R) & (rk3[:, None] < N))


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


def _config(op: str, config: dict | None, block_r: int = 16, exact: bool = False) -> dict:
    """CONFIGS[op], then its rank64 entries where the factor tile is 64 wide, its exact entries
    for exact fp32 dots, then config's (which may replace rank64 and exact too)."""
    cfg, user = dict(CONFIGS[op]), dict(config or {})
    special = {key: user.pop(key, cfg.pop(key, {})) for key in ("rank64", "exact")}
    for key in special:
        cfg.pop(key, None)
    unknown = set(user).union(*special.values()) - set(cfg)
    if unknown:
        raise ValueError(f"{op}: unknown config keys {sorted(unknown)} (known: {sorted(cfg)})")
    if block_r > 32:
        cfg.update(special["rank64"])
    if exact:
        cfg.update(special["exact"])
    cfg.update(user)
    return cfg


def _parts(dtype: torch.dtype, block_r: int, choice: str) -> int:
    """How the factor's parts meet the activation: exact fp32 dots unless the activation is bf16."""
    if dtype != torch.bfloat16:
        return _EXACT.value
    if choice == "auto":
        choice = "stacked" if 4 * block_r <= 128 else "chained"
    if choice not in ("stacked", "chained"):
        raise ValueError(f"parts must be 'stacked', 'chained' or 'auto', not {choice!r}")
    return _STACKED.value if choice == "stacked" else _CHAINED.value


def _num_warps(choice: int | None, acc_entries: int) -> int:
    return choice or (4 if acc_entries <= 8192 else 8)


def _target_programs(device: torch.device, per_sm: float) -> int:
    """Programs a split reduction aims for: per_sm per SM on a GPU; on the interpreter a few."""
    if device.type != "cuda":
        return num_programs_for_reduction(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, round(per_sm * _multiprocessors(index)))


def _check_terms(op: str, block: int) -> None:
    if not 16 <= block <= MAX_TERMS or block & (block - 1):
        raise ValueError(f"{op}: a dot covers {block} reduction terms; a power of two in [16, {MAX_TERMS}]")


def plan(
    op: str,
    m: int,
    k: int,
    r: int,
    bounds: Segments = (),
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    config: dict | None = None,
) -> dict:
    """How down, grad or grad_and_down runs on x (m, k) of `dtype` with rank r per segment: tiles,
    parts, warps, stages, the split of the reduction and the grid (the sweep prints it by its
    times). config as the op's."""
    device = torch.device(device)
    br = _block_r(r)
    cfg = _config(op, config, br, exact=dtype != torch.bfloat16)
    if op == "down" and not bounds and k >= LONG_K and cfg.get("parts") == "auto":
        cfg["parts"] = "chained"
    out = dict(block_r=br, num_stages=cfg["num_stages"], parts=_parts(dtype, br, cfg.get("parts", "stacked")))
    stacked = 4 if out["parts"] == _STACKED.value else 1
    target = _target_programs(device, cfg["programs_per_sm"])
    if op == "down":
        bm, bk = cfg["block_m"], cfg["block_k"]
        _check_terms(op, bk)
        m_blocks = triton.cdiv(m, bm)
        # split the reduction into chunks of one length until the grid fills the GPU (4096 rows
        # are only 32 row blocks); the splits' fp32 partials are summed in a second pass
        chunk = triton.cdiv(triton.cdiv(k, max(1, target // m_blocks)), bk) * bk
        cuts = [0, *bounds, k]
        splits = max(triton.cdiv(b - a, chunk) for a, b in zip(cuts, cuts[1:]))
        out.update(chunk=chunk, grid=(m_blocks, len(cuts[1:]) * splits), acc=bm * br * stacked)
    elif op == "grad":
        bm, bk = cfg["block_m"], segment_block(bounds, cfg["block_k"])
        _check_terms(op, bm)
        if not bk:
            raise ValueError(f"segment bounds {bounds} are not multiples of 16")
        k_blocks = triton.cdiv(k, bk)
        splits = max(1, min(triton.cdiv(m, bm), target // k_blocks))
        rows = triton.cdiv(triton.cdiv(m, splits), bm) * bm
        splits = triton.cdiv(m, rows)
        out.update(rows=rows, grid=(k_blocks, splits), acc=bk * br * stacked)
    elif op == "grad_and_down":
        bm, bk = cfg["block_m"], cfg["block_k"]
        _check_terms(op, bm)
        _check_terms(op, bk)
        if cfg["sub"] not in (1, 2, 4):
            raise ValueError(f"{op}: sub is 1, 2 or 4, not {cfg['sub']}")
        width = segment_block(bounds, bk * cfg["sub"])
        if not width:
            raise ValueError(f"segment bounds {bounds} are not multiples of 16")
        bk = min(bk, width)
        k_blocks = triton.cdiv(k, width)
        splits = max(1, min(triton.cdiv(m, bm), target // k_blocks))
        rows = triton.cdiv(triton.cdiv(m, splits), bm) * bm
        splits = triton.cdiv(m, rows)
        sub = width // bk
        out.update(rows=rows, grid=(k_blocks, splits), sub=sub, acc=(sub * bk + bm) * br * 4)
    else:
        raise ValueError(f"no plan for {op!r}")
    out.update(block_m=bm, block_k=bk, splits=splits, num_warps=_num_warps(cfg["num_warps"], out.pop("acc")))
    return out


def _launch(pl: dict) -> dict:
    """down's and grad's constexprs and launch options from their plan."""
    return dict(
        BM=pl["block_m"],
        BK=pl["block_k"],
        BR=pl["block_r"],
        PARTS=pl["parts"],
        num_warps=pl["num_warps"],
        num_stages=pl["num_stages"],
    )


def down(
    x: torch.Tensor, p: torch.Tensor, scale=1.0, bounds: Segments = (), *, config: dict | None = None
) -> torch.Tensor:
    """scale * x @ p.T in fp32: x (M, K) any float dtype, p (R, K) fp32 (any strides).
    With bounds, K is cut into segments and each gets its own product and scale, side by side:
    out[:, i R : (i + 1) R] = scale_i x[:, seg_i] @ p[:, seg_i].T (LoRA's g_i = s_i D_i B_i for
    q, k and v at once, from their stacked gradient). config overrides CONFIGS["down"]."""
    m, k = x.shape
    r = p.shape[0]
    b1, b2, scales, count = _segments(k, bounds, scale)
    if not use_triton(x, p):
        cuts = [0, *bounds, k]
        parts = [(x[:, a:b].float() @ p[:, a:b].float().t()) * s for a, b, s in zip(cuts, cuts[1:], scales)]
        return torch.cat(parts, dim=1)
    if m == 0 or k == 0:
        return torch.zeros((m, count * r), dtype=torch.float32, device=x.device)
    pl = plan("down", m, k, r, bounds, x.dtype, x.device, config)
    splits = pl["splits"]
    partial = torch.empty((splits, m, count * r), dtype=torch.float32, device=x.device)
    _down_kernel[pl["grid"]](
        x, p, partial, m, k, r, b1, b2, *scales, 0.0, splits, pl["chunk"],
        *x.stride(), *p.stride(), *partial.stride(), **_launch(pl),
    )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)


def up_add_(
    y: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    scale=1.0,
    round_first: bool = False,
    bounds: Segments = (),
    *,
    config: dict | None = None,
):
    """y += scale * u @ v.T in place: y (M, N), u (M, R) and v (N, R) fp32 (any strides). With
    bounds, N is cut into segments: y[:, seg_i] += scale_i u[:, i R : (i + 1) R] @ v[seg_i].T
    (q, k and v's LoRA terms into their stacked output at once); no block may straddle a cut.
    config overrides CONFIGS["up_add"]."""
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
    cfg = _config("up_add", config)
    dt, sc, exact = _kind(y.dtype)
    bm, bn = cfg["block_m"], segment_block(bounds, cfg["block_n"])
    if not bn:
        raise ValueError(f"segment bounds {bounds} are not multiples of 16")
    _up_add_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        y, u, v, m, n, r, b1, b2, *scales, *y.stride(), *u.stride(), *v.stride(),
        BM=bm, BN=bn, BR=_block_r(r), DT=dt, SCALE=sc, EXACT=exact, ROUND_FIRST=round_first,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return y


def grad(
    x: torch.Tensor,
    u: torch.Tensor,
    scale=1.0,
    bounds: Segments = (),
    rank: int | None = None,
    *,
    transposed: bool = False,
    config: dict | None = None,
) -> torch.Tensor:
    """scale * u.T @ x in fp32: x (M, K) any float dtype, u (M, R) fp32 -> (R, K). With bounds,
    K is cut into segments and u holds one rank-`rank` factor per segment, side by side:
    out[:, seg_i] = scale_i u[:, i r : (i + 1) r].T @ x[:, seg_i] (LoRA's dB_i^T for q, k and
    v at once); no block may straddle a cut. transposed: the (R, K) result is the transpose of
    a contiguous (K, R) buffer, so out[:, a:b].t() is contiguous (dB in B's own layout, which
    autograd then adopts as B.grad without a copy). config overrides CONFIGS["grad"]."""
    m, k = x.shape
    r = rank if bounds else u.shape[1]
    b1, b2, scales, count = _segments(k, bounds, scale)
    if not use_triton(x, u):
        cuts = [0, *bounds, k]
        parts = [
            (u[:, i * r : (i + 1) * r].float().t() @ x[:, a:b].float()) * s
            for i, (a, b, s) in enumerate(zip(cuts, cuts[1:], scales))
        ]
        out = torch.cat(parts, dim=1)
        return out.t().contiguous().t() if transposed else out
    if m == 0:
        out = torch.zeros((k, r) if transposed else (r, k), dtype=torch.float32, device=x.device)
        return out.t() if transposed else out
    pl = plan("grad", m, k, r, bounds, x.dtype, x.device, config)
    splits = pl["splits"]
    partial = torch.empty((splits, k, r) if transposed else (splits, r, k), dtype=torch.float32, device=x.device)
    strides = (1, r) if transposed else (k, 1)
    _grad_kernel[pl["grid"]](
        x, u, partial, m, k, r, pl["rows"], b1, b2, *scales, 0.0, *x.stride(), *u.stride(), *strides,
        **_launch(pl),
    )  # fmt: skip
    out = partial.sum(0) if splits > 1 else partial[0]  # the scales are applied in the kernel
    return out.t() if transposed else out


def grad_and_down(
    d: torch.Tensor,
    u: torch.Tensor,
    bt: torch.Tensor,
    scale=1.0,
    bounds: Segments = (),
    rank: int | None = None,
    *,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad(d, u, scale, bounds, rank), down(d, bt, scale, bounds)) in one pass over d: LoRA's
    dB^T = s u^T D and g = s D B read the same (M, N) gradient D. bt (R, N) fp32 is B^T (any
    strides). Each product is computed as its own op computes it (stacked parts, one dot per
    block of at most 64 terms, blocks summed in fp32), so the results are those two calls'.
    g's partial sums cost 2 R / (sub block_k) of D's bytes each way (1/8 at the defaults).
    Other than bf16 on a GPU (or the interpreter), or a rank above 32: the two calls."""
    m, n = d.shape
    r = rank if bounds else u.shape[1]
    if bt.shape != (r, n):
        raise ValueError(f"bt is {tuple(bt.shape)}, not ({r}, {n})")
    if not use_triton(d, u, bt) or d.dtype != torch.bfloat16 or _block_r(r) > 32 or m == 0 or n == 0:
        return grad(d, u, scale, bounds, rank), down(d, bt, scale, bounds)
    b1, b2, scales, count = _segments(n, bounds, scale)
    pl = plan("grad_and_down", m, n, r, bounds, d.dtype, d.device, config)
    (k_blocks, splits), width = pl["grid"], pl["block_k"] * pl["sub"]
    partial = torch.empty((splits, r, n), dtype=torch.float32, device=d.device)
    g_partial = torch.empty((k_blocks, m, r), dtype=torch.float32, device=d.device)
    _grad_down_kernel[pl["grid"]](
        d, u, bt, partial, g_partial, m, n, r, pl["rows"], b1, b2, *scales, 0.0,
        *d.stride(), *u.stride(), *bt.stride(),
        BM=pl["block_m"], BK=pl["block_k"], BR=pl["block_r"], SUB=pl["sub"],
        num_warps=pl["num_warps"], num_stages=pl["num_stages"],
    )  # fmt: skip
    db = partial.sum(0) if splits > 1 else partial[0]
    if count == 1:
        return db, g_partial.sum(0)
    g = torch.empty((m, count * r), dtype=torch.float32, device=d.device)
    cuts = [0, *bounds, n]  # each segment's blocks of columns, summed in order, into its columns of g
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        torch.sum(g_partial[a // width : triton.cdiv(b, width)], 0, out=g[:, i * r : (i + 1) * r])
    return db, g
