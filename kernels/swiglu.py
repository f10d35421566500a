"""SwiGLU's elementwise part, h = silu(e) * g, forward and backward, as Hugging Face Llama's
MLP computes it: `act_fn(gate_proj(x)) * up_proj(x)` with act_fn = SiLU.

Math (e = gate projection, g = up projection, both of dtype d; everything below in fp32):

    s = sigmoid(e) = 1 / (1 + exp(-e))
    f = silu(e) = e * s                           HF: F.silu computes in fp32, rounds to d
    h = d( d(f) * g )                             HF's cast points: f rounded to d, then the product

Backward, with dh the incoming gradient; the casts d() are the identity for the derivative,
as autograd treats them:

    dh/dg = f                      ->  dg = dh * f
    df/de = s + e * s * (1 - s)    (d sigmoid/de = s (1 - s))
          = s * (1 + e * (1 - s))  ->  de = dh * g * s * (1 + e * (1 - s))

Both gradients come from e and g alone: h and f are recomputed, never kept. Each is computed
in fp32 from the d-valued inputs and rounded once, where eager autograd rounds dh * g to d
before the SiLU backward and uses the rounded d(f) for dg: our error is at most eager's.

Memory traffic (N elements of b bytes each): forward reads e and g and writes h: 3 N b.
Backward reads dh, e and g and writes de and dg: 5 N b. Saved for backward: e and g, which
the two projections produced anyway. Eager also saves silu(e) (N b more per MLP) and moves
6 N b forward (silu: read e, write f; mul: read f and g, write h) and about 9 N b backward.

Layout: (ROWS x BLOCK)-element tiles of row-strided 2-D views (so e and g may be the two
column blocks of one GEMM output, and h or de/dg the first columns of a wider buffer), int64
row offsets (tokens x intermediate size exceeds 2^31 at long contexts), 16-byte vector loads;
one program per tile, or a persistent grid looping over them (PROGRAMS_PER_SM); dense tensors
may be taken as one flat range (FLAT). Loads and stores go unmasked where the tiles divide the
shape (Llama's 14336 columns). The launch settings change the schedule only: every choice
computes the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.runtime import _multiprocessors, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Launch configuration, module-level so that benchmarks/bench_elementwise.py --sweep can time
# alternatives without code edits (every choice computes the same bits).
#
# BLOCK columns per program tile and NUM_WARPS: 8 bf16 elements (one 16-byte vector) per
# thread per tensor. Measured on an H200 (16384 x 14336 bf16): forward streams at the copy
# rate for any block of 1024 to 8192; backward (five tensors) ran at 4285 GB/s with 1024 / 4
# warps, 3882 GB/s with 4096 / 8 warps (fewer registers per thread, more programs resident).
BLOCK = 1024
NUM_WARPS = 4
# The backward's own block and warps; None: BLOCK and NUM_WARPS.
BLOCK_BACKWARD: int | None = None
NUM_WARPS_BACKWARD: int | None = None
# Rows per program tile: a (ROWS x BLOCK) tile, ROWS vectors per thread per tensor.
ROWS = 1
# True: where every tensor is dense (row stride = columns) and has fewer than 2^31 - BLOCK
# elements, one flat range split into BLOCK-element tiles (int32 offsets, no row arithmetic).
FLAT = False
# True: backward loads g together with dh and e, before dg is stored (else after: the compiler
# cannot move a load above a store that may alias it, so each thread waits twice for memory).
LOADS_FIRST = False
# True: loads hint evict_first (every element is read once).
EVICT_FIRST = False
# > 0: a persistent grid of that many programs per SM (at most one per tile), each looping over
# tiles; 0: one program per tile. Only as many as fit on an SM at once (registers, warps) help:
# the others start when a resident one has finished all its tiles.
PROGRAMS_PER_SM = 0


@triton.jit
def _tile(tile, rows, cols, col_blocks, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_ROW: tl.constexpr):
    """Row indices (int64; unused when ONE_ROW), column indices and mask of a tile."""
    if ONE_ROW:
        c = tile * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        r = c
        mask = c < cols
    else:
        rb = tile // col_blocks
        r = (rb * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        c = ((tile - rb * col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (r < rows) & (c < cols)
    return r, c, mask


@triton.jit
def _offsets(r, c, stride, ONE_ROW: tl.constexpr):
    if ONE_ROW:
        offs = c
    else:
        offs = r * stride + c
    return offs


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr, EVICT: tl.constexpr):
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0.0, eviction_policy=EVICT)
    else:
        x = tl.load(ptr, eviction_policy=EVICT)
    return x.to(tl.float32)


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty))


@triton.jit
def _forward_tile(E, G, H, tile, rows, cols, col_blocks, se, sg, sh,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_ROW: tl.constexpr, MASKED: tl.constexpr,
                  EVICT: tl.constexpr):  # fmt: skip
    r, c, mask = _tile(tile, rows, cols, col_blocks, BLOCK_R, BLOCK_C, ONE_ROW)
    e = _load(E + _offsets(r, c, se, ONE_ROW), mask, MASKED, EVICT)
    g = _load(G + _offsets(r, c, sg, ONE_ROW), mask, MASKED, EVICT)
    f = (e / (1.0 + tl.exp(-e))).to(H.dtype.element_ty).to(tl.float32)  # HF rounds silu(e) to d
    _store(H + _offsets(r, c, sh, ONE_ROW), f * g, mask, MASKED)


@triton.jit
def _swiglu_forward(E, G, H, rows, cols, col_blocks, tiles, se, sg, sh,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_ROW: tl.constexpr, MASKED: tl.constexpr,
                    EVICT: tl.constexpr, PERSISTENT: tl.constexpr):  # fmt: skip
    if PERSISTENT:
        for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
            _forward_tile(E, G, H, tile, rows, cols, col_blocks, se, sg, sh, BLOCK_R, BLOCK_C, ONE_ROW, MASKED, EVICT)
    else:
        _forward_tile(
            E, G, H, tl.program_id(0), rows, cols, col_blocks, se, sg, sh, BLOCK_R, BLOCK_C, ONE_ROW, MASKED, EVICT
        )


@triton.jit
def _backward_tile(DH, E, G, DE, DG, tile, rows, cols, col_blocks, sdh, se, sg, sde, sdg,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_ROW: tl.constexpr, MASKED: tl.constexpr,
                   EVICT: tl.constexpr, NEED_DE: tl.constexpr, NEED_DG: tl.constexpr,
                   LOADS_FIRST: tl.constexpr):  # fmt: skip
    r, c, mask = _tile(tile, rows, cols, col_blocks, BLOCK_R, BLOCK_C, ONE_ROW)
    dh = _load(DH + _offsets(r, c, sdh, ONE_ROW), mask, MASKED, EVICT)
    e = _load(E + _offsets(r, c, se, ONE_ROW), mask, MASKED, EVICT)
    if NEED_DE and LOADS_FIRST:
        g = _load(G + _offsets(r, c, sg, ONE_ROW), mask, MASKED, EVICT)
    one_plus_t = 1.0 + tl.exp(-e)
    if NEED_DG:  # f = silu(e) as the forward (and PyTorch) computes it
        _store(DG + _offsets(r, c, sdg, ONE_ROW), dh * (e / one_plus_t), mask, MASKED)
    if NEED_DE:
        if not LOADS_FIRST:
            g = _load(G + _offsets(r, c, sg, ONE_ROW), mask, MASKED, EVICT)
        s = 1.0 / one_plus_t
        de = dh * g * s * (1.0 + e * (1.0 - s))  # dh * g first, as eager's order
        _store(DE + _offsets(r, c, sde, ONE_ROW), de, mask, MASKED)


@triton.jit
def _swiglu_backward(DH, E, G, DE, DG, rows, cols, col_blocks, tiles, sdh, se, sg, sde, sdg,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_ROW: tl.constexpr, MASKED: tl.constexpr,
                     EVICT: tl.constexpr, PERSISTENT: tl.constexpr, NEED_DE: tl.constexpr,
                     NEED_DG: tl.constexpr, LOADS_FIRST: tl.constexpr):  # fmt: skip
    if PERSISTENT:
        for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
            _backward_tile(
                DH, E, G, DE, DG, tile, rows, cols, col_blocks, sdh, se, sg, sde, sdg,
                BLOCK_R, BLOCK_C, ONE_ROW, MASKED, EVICT, NEED_DE, NEED_DG, LOADS_FIRST,
            )  # fmt: skip
    else:
        _backward_tile(
            DH, E, G, DE, DG, tl.program_id(0), rows, cols, col_blocks, sdh, se, sg, sde, sdg,
            BLOCK_R, BLOCK_C, ONE_ROW, MASKED, EVICT, NEED_DE, NEED_DG, LOADS_FIRST,
        )  # fmt: skip


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) view with unit column stride (a copy only if there is none)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 1 else t.view(1, -1)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rows_view(t: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """`t` as a (rows, cols) view that writes reach: unit column stride, rows apart; or None."""
    if t.numel() != shape.numel():
        return None
    try:
        t2 = t.view(shape)
    except RuntimeError:
        return None
    rows, cols = shape
    if (t2.stride(1) == 1 or cols <= 1) and (t2.stride(0) >= cols or rows <= 1):
        return t2
    return None


def _plan(rows: int, cols: int, tensors: list[torch.Tensor], forward: bool) -> tuple[tuple, dict, int]:
    """(rows, cols, col_blocks, tiles, strides...), the constexprs, and the program count, for
    2-D (rows, cols) tensors with unit column stride."""
    block = BLOCK if forward or BLOCK_BACKWARD is None else BLOCK_BACKWARD
    warps = NUM_WARPS if forward or NUM_WARPS_BACKWARD is None else NUM_WARPS_BACKWARD
    strides = [t.stride(0) if rows > 1 else cols for t in tensors]
    one_row = rows == 1 or (FLAT and all(s == cols for s in strides) and rows * cols < 2**31 - block)
    if one_row:  # one flat range of rows * cols elements
        rows, cols, block_r = 1, rows * cols, 1
    else:
        block_r = max(1, ROWS)
    col_blocks = triton.cdiv(cols, block)
    tiles = triton.cdiv(rows, block_r) * col_blocks
    programs = tiles
    if PROGRAMS_PER_SM > 0:
        device = tensors[0].device
        sms = (
            _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
            if device.type == "cuda"
            else 2
        )
        programs = min(tiles, PROGRAMS_PER_SM * sms)
    constexprs = dict(
        BLOCK_R=block_r,
        BLOCK_C=block,
        ONE_ROW=one_row,
        MASKED=cols % block != 0 or rows % block_r != 0,
        EVICT="evict_first" if EVICT_FIRST else "",
        PERSISTENT=programs < tiles,
        num_warps=warps,
    )
    return (rows, cols, col_blocks, tiles, *strides), constexprs, programs


def _out_rows(t: torch.Tensor | None, like: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """Where the kernel writes `t` (None stays None), of the inputs' `shape` or their (rows,
    cols) one (like's): t itself as (rows, cols) where it views so with like's dtype and
    device, else a temporary to copy into t afterwards."""
    if t is None:
        return None
    if t.shape != shape and t.shape != like.shape:
        raise ValueError(f"output of shape {tuple(t.shape)} for inputs of {tuple(shape)}")
    t2 = _rows_view(t, like.shape) if t.dtype == like.dtype and t.device == like.device else None
    return t2 if t2 is not None else torch.empty(like.shape, dtype=like.dtype, device=like.device)


def _write_back(t: torch.Tensor | None, t2: torch.Tensor | None) -> None:
    if t is not None and (t2.data_ptr() != t.data_ptr() or t2.dtype != t.dtype):
        t.copy_(t2.view(t.shape))


def silu_mul(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(e) * g for e, g of one shape, taken as (rows, last dim) with any row stride (e.g.
    two column blocks of one buffer). `out`, when given, receives h and is returned: e's shape
    or its (rows, cols) one, any row stride (e.g. the first cols columns of a wider (rows,
    cols + n) buffer); written directly where it views as rows of unit column stride and has
    e's dtype, else through a temporary."""
    e2, g2 = _rows(e), _rows(g)
    h2 = _out_rows(out, e2, e.shape) if out is not None else torch.empty(e2.shape, dtype=e.dtype, device=e.device)
    rows, cols = e2.shape
    if e2.numel() > 0:
        args, constexprs, programs = _plan(rows, cols, [e2, g2, h2], forward=True)
        _swiglu_forward[(programs,)](e2, g2, h2, *args, **constexprs)
    if out is None:
        return h2
    _write_back(out, h2)
    return out


def silu_mul_backward(dh, e, g, de: torch.Tensor | None, dg: torch.Tensor | None) -> None:
    """de and dg (e's shape or its (rows, cols) one, any row stride; either may be None) from
    dh, e and g."""
    dh2, e2, g2 = _rows(dh), _rows(e), _rows(g)
    rows, cols = e2.shape
    if e2.numel() == 0 or (de is None and dg is None):
        return
    de2, dg2 = _out_rows(de, e2, e.shape), _out_rows(dg, e2, e.shape)
    de_ptr = de2 if de2 is not None else e2  # never written: NEED_DE is off
    dg_ptr = dg2 if dg2 is not None else g2
    args, constexprs, programs = _plan(rows, cols, [dh2, e2, g2, de_ptr, dg_ptr], forward=False)
    _swiglu_backward[(programs,)](
        dh2, e2, g2, de_ptr, dg_ptr, *args, **constexprs,
        NEED_DE=de2 is not None, NEED_DG=dg2 is not None, LOADS_FIRST=LOADS_FIRST,
    )  # fmt: skip
    _write_back(de, de2)
    _write_back(dg, dg2)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        e, g = _rows(gate), _rows(up)
        ctx.save_for_backward(e, g)
        ctx.shape = gate.shape
        return silu_mul(e, g).view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        e, g = ctx.saved_tensors
        need_de, need_dg = ctx.needs_input_grad
        de = torch.empty_like(e) if need_de else None
        dg = torch.empty_like(g) if need_dg else None
        silu_mul_backward(dh, e, g, de, dg)
        return (
            de.view(ctx.shape) if de is not None else None,
            dg.view(ctx.shape) if dg is not None else None,
        )


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF's math in PyTorch (F.silu rounds to the input dtype, then the product); autograd derives the backward."""
    return F.silu(gate) * up


def swiglu_unsupported(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors, or None."""
    if gate.dtype not in SUPPORTED_DTYPES or up.dtype != gate.dtype:
        return f"unsupported dtypes {gate.dtype} / {up.dtype} (the kernel takes one of fp32, bf16, fp16 for both)"
    if gate.shape != up.shape:
        return f"shapes {tuple(gate.shape)} and {tuple(up.shape)} differ (broadcasting is not fused)"
    if gate.device != up.device:
        return f"inputs on {gate.device} and {up.device}"
    return None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with HF's cast points; Triton where it can run, else the reference."""
    if swiglu_unsupported(gate, up) is None and use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
