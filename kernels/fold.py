"""The LoRA term folded into the base GEMM as extra reduction columns.

Projections i = 1..k share an input x (M, K) bf16 and a stacked frozen weight W (sum N_i, K);
each adds its term s_i u_i B_i^T with u_i = x A_i^T (M, r_i) and B_i (N_i, r_i), both fp32.
Added after the GEMM (lowrank.up_add_), the terms cost one more read and write of y, 2 M N b
bytes. Folded, they ride along in the GEMM's own reduction:

    U  = [s_1 u_1 | ... | s_k u_k]             (M, R) fp32, R = sum r_i
    U0 = bf16(U),  U1 = bf16(U - U0)            U = U0 + U1 + O(2^-17 |U|)
    Bd = bf16(blockdiag(B_1, ..., B_k))         (sum N_i, R): row block i holds B_i in column block i
    y  = [x | U0 | U1 | 0] @ [W | Bd | Bd | 0]^T = x W^T + U Bd^T + O(2^-17 |U| |Bd|)

one GEMM over K + e columns, e = 2 R rounded up so that K + e is a multiple of 8 (16-byte rows
for the tensor cores; the padding is zero on both sides), accumulated in fp32 and rounded once.

Accuracy: each product term u_j b_j carries bf16(b_j)'s rounding, at most 2^-9 relative: the
size of the rounding PEFT's Linear4bit applies to the whole term before its add (round_first),
plus U's 2^-17 residual. PEFT then rounds x W^T, the term and their sum, three roundings of
2^-9; here y is rounded once. So the folded y is no less accurate than eager's (tests compare
both against float64). The gradients are unchanged: backward still runs the exact fp32 rank-r
products (kernels/lowrank.py) from the fp32 u and D.

Cost: e / K more GEMM work (Llama-8B, r = 16: +2.3% of q|k|v's, +1.6% of gate|up's, +0.2% of
down's), against up_add's 2 M N b bytes (q|k|v, gate|up and down at 4096 tokens: 100, 470 and
67 MB a layer, about 150 us at 4.2 TB/s). The input needs a producer that writes x straight
into the wider buffer (the RMSNorm prologue, SwiGLU): copying x there would cost what it saves.

Backward, the mirror: dx = D W + G A with G = [s_1 D_1 B_1 | ...] (M, R) fp32 (lowrank.down)
and A = [A_1; ...; A_k] (R, K) is one GEMM over N + e rows,

    dx = [D | G0 | G1 | 0] @ [W; Ad; Ad; 0],   Ad = bf16(A)

where D is the stacked output gradient: the MLP node writes SwiGLU's backward straight into
the wider buffer, q|k|v's three gradients are concatenated into it (a copy eager makes too),
and down's single gradient is copied there because N < K (2 M N b bytes against up_add's
2 M K b). The same argument bounds the error: PEFT rounds the term g A to bf16 before adding
it to the rounded D W; here A carries one bf16 rounding and dx is rounded once.

Only bf16 (x and the compute dtype): fp16's residual U1 would go subnormal, fp32 needs no fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.runtime import use_triton

# The most columns a fold may add (q|k|v at r = 64: 2 x 192 = 384): the fill kernel holds a
# row of them, and past this the extra GEMM work outgrows the traffic saved.
MAX_COLUMNS = 512


def columns(in_features: int, ranks: Sequence[int], x_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """The extra columns e the fold adds to an input of in_features columns, or 0 where it does
    not apply (not bf16, K not a multiple of 8, more than three projections, too wide)."""
    if x_dtype != torch.bfloat16 or compute_dtype != torch.bfloat16 or in_features % 8 or not 0 < len(ranks) <= 3:
        return 0
    e = -(-2 * sum(ranks) // 8) * 8
    return e if e <= MAX_COLUMNS else 0


@triton.jit
def _fill_weight_kernel(
    W, B0, B1, B2, N, R, E, n1, n2, c1, c2, sb0n, sb0r, sb1n, sb1r, sb2n, sb2r, swn,
    BN: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    rn = tl.cast(tl.program_id(0), tl.int64) * BN + tl.arange(0, BN)
    rc = tl.arange(0, BE)  # extra column: Bd's R, again, then zero padding up to E
    col = tl.where(rc >= R, rc - R, rc)
    row_seg = (rn >= n1).to(tl.int32) + (rn >= n2).to(tl.int32)
    col_seg = (col >= c1).to(tl.int32) + (col >= c2).to(tl.int32)
    hit = (row_seg[:, None] == col_seg[None, :]) & (rc[None, :] < 2 * R) & (rn[:, None] < N)
    v = tl.load(B0 + rn[:, None] * sb0n + col[None, :] * sb0r, mask=hit & (row_seg[:, None] == 0), other=0.0)
    v += tl.load(
        B1 + (rn - n1)[:, None] * sb1n + (col - c1)[None, :] * sb1r, mask=hit & (row_seg[:, None] == 1), other=0.0
    )
    v += tl.load(
        B2 + (rn - n2)[:, None] * sb2n + (col - c2)[None, :] * sb2r, mask=hit & (row_seg[:, None] == 2), other=0.0
    )
    tl.store(W + rn[:, None] * swn + rc[None, :], v.to(W.dtype.element_ty), mask=(rn[:, None] < N) & (rc[None, :] < E))


def fill_weight(w_ext: torch.Tensor, Bs: Sequence[torch.Tensor], k: int) -> None:
    """w_ext[:, k:] <- [Bd | Bd | 0] (w_ext is (sum N_i, k + e); its first k columns are W)."""
    ranks = sum(B.shape[1] for B in Bs)
    rows = w_ext.shape[0]
    if not use_triton(w_ext, *Bs):
        bd = torch.block_diag(*Bs) if len(Bs) > 1 else Bs[0]
        w_ext[:, k : k + 2 * ranks].view(rows, 2, ranks).copy_(bd[:, None, :])
        w_ext[:, k + 2 * ranks :].zero_()
        return
    row_cuts = [sum(B.shape[0] for B in Bs[: i + 1]) for i in range(len(Bs))]
    col_cuts = [sum(B.shape[1] for B in Bs[: i + 1]) for i in range(len(Bs))]
    n1, n2 = (row_cuts + [rows, rows])[:2]
    c1, c2 = (col_cuts + [ranks, ranks])[:2]
    b0, b1, b2 = (list(Bs) + [Bs[0], Bs[0]])[:3]
    bn = 64
    _fill_weight_kernel[(triton.cdiv(rows, bn),)](
        w_ext[:, k:], b0, b1, b2, rows, ranks, w_ext.shape[1] - k, n1, n2, c1, c2,
        *b0.stride(), *b1.stride(), *b2.stride(), w_ext.stride(0),
        BN=bn, BE=triton.next_power_of_2(w_ext.shape[1] - k),
    )  # fmt: skip


def fill_rows(w_ext: torch.Tensor, As: Sequence[torch.Tensor], n: int) -> None:
    """w_ext[n:] <- [Ad; Ad; 0], Ad = bf16([A_1; ...; A_k]) (R, K): dx's fold, where the
    gradient D takes the columns [G0 | G1 | 0] and the dense weight these rows."""
    a = torch.cat(list(As)) if len(As) > 1 else As[0]
    ranks = a.shape[0]
    w_ext[n : n + 2 * ranks].view(2, ranks, w_ext.shape[1]).copy_(a[None])
    if w_ext.shape[0] > n + 2 * ranks:
        w_ext[n + 2 * ranks :].zero_()


@triton.jit
def _fill_input_kernel(
    U, X, M, R, E, c1, c2, s0, s1, s2, sum_, sur, sxm,
    BM: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    rm = tl.cast(tl.program_id(0), tl.int64) * BM + tl.arange(0, BM)
    rc = tl.arange(0, BE)  # extra column: U0's R, then U1's R, then zero padding up to E
    second = rc >= R
    col = tl.where(second, rc - R, rc)
    live = (rm[:, None] < M) & (rc[None, :] < 2 * R)
    u = tl.load(U + rm[:, None] * sum_ + col[None, :] * sur, mask=live, other=0.0)
    scale = tl.where(col < c1, s0, tl.where(col < c2, s1, s2))
    v = u * scale[None, :]
    hi = v.to(tl.bfloat16)
    lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    tl.store(
        X + rm[:, None] * sxm + rc[None, :],
        tl.where(second[None, :], lo, hi),
        mask=(rm[:, None] < M) & (rc[None, :] < E),
    )


def fill_input(x_ext: torch.Tensor, u: torch.Tensor, ranks: Sequence[int], scales: Sequence[float], k: int) -> None:
    """x_ext[:, k:] <- [U0 | U1 | 0] from u = [u_1 | ... | u_k] (M, R) fp32 and one scale per
    projection (x_ext is (M, k + e); its first k columns are x)."""
    m, r = u.shape
    e = x_ext.shape[1] - k
    cuts = [sum(ranks[: i + 1]) for i in range(len(ranks))]
    c1, c2 = (cuts + [r, r])[:2]
    s0, s1, s2 = (list(scales) + [0.0, 0.0])[:3]
    if not use_triton(x_ext, u):
        v = torch.cat([u[:, a:b] * s for a, b, s in zip([0, *cuts], cuts, scales)], dim=1)
        hi = v.to(torch.bfloat16)
        x_ext[:, k : k + r] = hi
        x_ext[:, k + r : k + 2 * r] = (v - hi.float()).to(torch.bfloat16)
        x_ext[:, k + 2 * r :].zero_()
        return
    bm = 64
    _fill_input_kernel[(triton.cdiv(m, bm),)](
        u, x_ext[:, k:], m, r, e, c1, c2, float(s0), float(s1), float(s2), *u.stride(), x_ext.stride(0),
        BM=bm, BE=triton.next_power_of_2(e),
    )  # fmt: skip


# Columns per program of stack_into: a block never straddles a source, so each program copies
# one source's rows with full-width vector loads and stores.
STACK_BLOCK = 128


@triton.jit
def _stack_kernel(
    OUT, S0, S1, S2, M, c1, c2, so, s0, s1, s2,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(1) * BN
    seg = (start >= c1).to(tl.int32) + (start >= c2).to(tl.int32)
    src = tl.where(seg == 0, S0, tl.where(seg == 1, S1, S2))
    stride = tl.where(seg == 0, s0, tl.where(seg == 1, s1, s2))
    first = tl.where(seg == 0, 0, tl.where(seg == 1, c1, c2))
    rm = tl.cast(tl.program_id(0), tl.int64) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    mask = (rm < M)[:, None]
    values = tl.load(src + rm[:, None] * stride + (start - first + cols)[None, :], mask=mask)
    tl.store(OUT + rm[:, None] * so + (start + cols)[None, :], values, mask=mask)


def stack_into(out: torch.Tensor, sources: Sequence[torch.Tensor]) -> None:
    """out[:, columns of source i] <- source i, side by side (out may be the first columns of
    a wider buffer: the fold's D_ext). One launch at copy bandwidth where every source's width
    is a multiple of STACK_BLOCK and there are at most three (q, k and v); else PyTorch's cat,
    whose copy into a row-strided destination runs at a third of that (H200, 2026-11-29)."""
    widths = [t.shape[1] for t in sources]
    if (
        not use_triton(out, *sources)
        or len(sources) > 3
        or any(w % STACK_BLOCK for w in widths)
        or any(t.stride(1) != 1 or t.dtype != out.dtype for t in sources)
        or out.stride(1) != 1
    ):
        torch.cat(list(sources), dim=1, out=out)
        return
    m = out.shape[0]
    cuts = [sum(widths[: i + 1]) for i in range(len(widths))]
    c1, c2 = (cuts + [cuts[-1], cuts[-1]])[:2]
    s = (list(sources) + [sources[0], sources[0]])[:3]
    bm = 16 if out.device.type == "cuda" else 64  # 16 x 128 bf16: 4 KiB a program on a GPU
    _stack_kernel[(triton.cdiv(m, bm), cuts[-1] // STACK_BLOCK)](
        out, *s, m, c1, c2, out.stride(0), *(t.stride(0) for t in s), BM=bm, BN=STACK_BLOCK,
    )  # fmt: skip
