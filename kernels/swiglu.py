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

Both gradients come from e and g alone: h and f are recomputed, never kept (the backward can
also write h, for a caller that needs it afterwards). Each is computed
in fp32 from the d-valued inputs and rounded once, where eager autograd rounds dh * g to d
before the SiLU backward and uses the rounded d(f) for dg: our error is at most eager's.

Memory traffic (N elements of b bytes each): forward reads e and g and writes h: 3 N b.
Backward reads dh, e and g and writes de and dg: 5 N b. Saved for backward: e and g, which
the two projections produced anyway. Eager also saves silu(e) (N b more per MLP) and moves
6 N b forward (silu: read e, write f; mul: read f and g, write h) and about 9 N b backward.

Layout: BLOCK elements of one row per program over row-strided 2-D views (so e and g may be
the two column blocks of one GEMM output), int64 row offsets (tokens x intermediate size
exceeds 2^31 at long contexts), 16-byte vector loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.runtime import use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements per program and warps: 8 bf16 elements (one 16-byte vector) per thread per tensor.
# Measured on an H200 (16384 x 14336 bf16): forward streams at the copy rate for any block of
# 1024 to 8192; backward (five tensors) ran at 4285 GB/s with 1024 / 4 warps, 3882 GB/s with
# 4096 / 8 warps (fewer registers per thread, more programs resident per SM). The backward
# issues its three loads before its first store: fwd+bwd 220.3 us at 4096 tokens and 865.7 at
# 16384, against 222.2 and 872.7 with g loaded after dg's store (same run, RESULTS.md).
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _swiglu_forward(E, G, H, cols, col_blocks, se, sg, sh, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.cast(pid // col_blocks, tl.int64)
    offs = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    e = tl.load(E + row * se + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
    f = (e / (1.0 + tl.exp(-e))).to(H.dtype.element_ty).to(tl.float32)  # HF rounds silu(e) to d
    tl.store(H + row * sh + offs, (f * g).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(
    DH, E, G, DE, DG, H, cols, col_blocks, sdh, se, sg, sde, sdg, sh,
    BLOCK: tl.constexpr, NEED_DE: tl.constexpr, NEED_DG: tl.constexpr, NEED_H: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = tl.cast(pid // col_blocks, tl.int64)
    offs = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < cols
    dh = tl.load(DH + row * sdh + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(E + row * se + offs, mask=mask, other=0.0).to(tl.float32)
    if NEED_DE or NEED_H:  # every load before the first store (h may be written over dh)
        g = tl.load(G + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
    one_plus_t = 1.0 + tl.exp(-e)
    f = e / one_plus_t  # silu(e) as the forward (and PyTorch) computes it
    if NEED_DG:
        tl.store(DG + row * sdg + offs, (dh * f).to(DG.dtype.element_ty), mask=mask)
    if NEED_H:  # h again, the forward's bits (for a caller that needs it after this pass)
        h = f.to(H.dtype.element_ty).to(tl.float32) * g
        tl.store(H + row * sh + offs, h.to(H.dtype.element_ty), mask=mask)
    if NEED_DE:
        s = 1.0 / one_plus_t
        de = dh * g * s * (1.0 + e * (1.0 - s))  # dh * g first, as eager's order
        tl.store(DE + row * sde + offs, de.to(DE.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) view with unit column stride (a copy only if there is none)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 1 else t.view(1, -1)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def silu_mul(e: torch.Tensor, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(e) * g as 2-D row-strided tensors (e.g. two column blocks of one buffer)."""
    e2, g2 = _rows(e), _rows(g)
    h = torch.empty(e2.shape, dtype=e.dtype, device=e.device) if out is None else out
    rows, cols = e2.shape
    if e2.numel() > 0:
        blocks = triton.cdiv(cols, BLOCK)
        _swiglu_forward[(rows * blocks,)](
            e2, g2, h, cols, blocks, e2.stride(0), g2.stride(0), h.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return h


def silu_mul_backward(
    dh, e, g, de: torch.Tensor | None, dg: torch.Tensor | None, h: torch.Tensor | None = None
) -> None:
    """de and dg (2-D, row-strided, either may be None) from dh, e and g; and h = silu(e) * g
    (the forward's bits) into h when given: the pass reads e and g anyway, so a caller that
    needs h after the backward gets it for its write alone (the fused MLP's dA of down). h may
    be dh itself: each element of dh is read before h's is written, by the same program."""
    dh2, e2, g2 = _rows(dh), _rows(e), _rows(g)
    rows, cols = e2.shape
    if e2.numel() == 0 or (de is None and dg is None and h is None):
        return
    blocks = triton.cdiv(cols, BLOCK)
    _swiglu_backward[(rows * blocks,)](
        dh2, e2, g2, de if de is not None else e2, dg if dg is not None else g2, h if h is not None else e2,
        cols, blocks, dh2.stride(0), e2.stride(0), g2.stride(0),
        de.stride(0) if de is not None else 0, dg.stride(0) if dg is not None else 0, h.stride(0) if h is not None else 0,
        BLOCK=BLOCK, NEED_DE=de is not None, NEED_DG=dg is not None, NEED_H=h is not None, num_warps=NUM_WARPS,
    )  # fmt: skip


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
