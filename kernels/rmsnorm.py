"""RMSNorm, forward and backward, as Hugging Face Llama computes it.

Math (one row x of length N, weight w, input dtype d, output dtype o = promote(d, w.dtype)):

    x32 = float32(x)
    r   = 1 / sqrt(mean(x32^2) + eps)            one fp32 per row, saved for backward
    xh  = x32 * r
    y   = o( w * d(xh) )                          HF's cast points: xh rounded to d first

Backward, with dy the incoming gradient and g = dy * w (fp32); the cast d() is the identity
for the derivative, as autograd treats it:

    dy/dx_k through xh_j = x_j r:   d xh_j / d x_k = r delta_jk + x_j dr/dx_k
    dr/dx_k = -1/2 (mean(x^2) + eps)^(-3/2) * 2 x_k / N = -r^3 x_k / N
    dx_k = sum_j g_j (r delta_jk - r^3 x_j x_k / N) = r (g_k - xh_k * mean_j(g_j xh_j))
    dw_j = sum over rows of dy_j * xh_j

Each program normalises a tile of rows (about 8K elements on a GPU). dx is row-local. dw
reduces across rows: a persistent grid of P programs, each owning a strided set of row tiles, accumulates a partial dw in fp32 registers and writes one row of a
(P, N) fp32 buffer; the P partial rows are then summed in fp32 (the two-stage reduction).
Peers skip dw, which silently freezes trainable norm weights; we never do.

Memory traffic (T rows of N elements, b bytes each): forward reads x and w and writes y and
r: 2 T N b + 4 T bytes. Backward reads dy, x and r and writes dx: 3 T N b + 4 T, plus
P N 4 bytes of partials. Nothing but x (which the residual stream keeps alive anyway) and
r is saved: y and the fp32 copy of x that eager autograd keeps are not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.runtime import num_programs_for_reduction, use_triton


@triton.jit
def _rmsnorm_forward(X, W, Y, R, stride_x, stride_y, rows, N, eps, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.cast(tl.program_id(0), tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    mask = (r[:, None] < rows) & (cols[None, :] < N)
    x = tl.load(X + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    xh = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + r[:, None] * stride_y + cols[None, :], (w[None, :] * xh).to(Y.dtype.element_ty), mask=mask)
    tl.store(R + r, rstd, mask=r < rows)


@triton.jit
def _rmsnorm_backward(
    DY, X, W, R, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, rows, N,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * ROWS, rows, programs * ROWS):
        r = tl.cast(start, tl.int64) + tl.arange(0, ROWS)
        mask = (r[:, None] < rows) & (cols[None, :] < N)
        x = tl.load(X + r[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(R + r, mask=r < rows, other=0.0)
        xh = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xh * (tl.sum(g * xh, axis=1) / N)[:, None])
        tl.store(DX + r[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += tl.sum(dy * xh, axis=0)
    if HAS_DW:
        tl.store(DW_PARTIAL + pid * N + cols, dw, mask=cols < N)


# Elements of x a program holds on a GPU (whole rows, up to 64 of them); the interpreter runs
# every program as a Python loop, so it takes more.
ELEMENTS_PER_PROGRAM = 8192


def _launch_shape(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, rows per program, warps)."""
    block = triton.next_power_of_2(n)
    budget = ELEMENTS_PER_PROGRAM if device.type == "cuda" else 65536
    rows = max(1, min(64, budget // block))
    return block, rows, min(16, max(1, rows * block // 512))


def rmsnorm_forward(
    x2: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the per-row r of (rows, N) rows, no autograd: Triton where it can run, else PyTorch.
    y is written into `out` when given: (rows, N) of y's dtype with unit column stride (e.g. the
    first columns of a wider buffer)."""
    rows, n = x2.shape
    out_dtype = torch.promote_types(x2.dtype, weight.dtype)
    if out is not None and (out.shape != x2.shape or out.dtype != out_dtype or out.stride(-1) != 1):
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype}, needs {tuple(x2.shape)} {out_dtype} with unit column stride"
        )
    if not use_triton(x2, weight, *([out] if out is not None else [])):
        x32 = x2.float()
        r = torch.rsqrt(x32.pow(2).mean(-1) + eps)
        y = (weight * (x32 * r[:, None]).to(x2.dtype)).to(out_dtype)
        return (y if out is None else out.copy_(y)), r
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=out_dtype, device=x2.device) if out is None else out
    r = torch.empty(rows, dtype=torch.float32, device=x2.device)
    block, per_program, warps = _launch_shape(n, x2.device)
    if rows > 0:
        _rmsnorm_forward[(triton.cdiv(rows, per_program),)](
            x2, weight, y, r, x2.stride(0), y.stride(0), rows, n, eps,
            ROWS=per_program, BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
    return y, r


def rmsnorm_backward(
    dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, r: torch.Tensor, needs_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx (and dw when needed) from the saved x and r, no autograd (the docstring's formulas)."""
    rows, n = x2.shape
    if not use_triton(dy2, x2, weight):
        xh = x2.float() * r[:, None]
        g = dy2.float() * weight.float()
        dx = r[:, None] * (g - xh * (g * xh).mean(-1, keepdim=True))
        dw = (dy2.float() * xh).sum(0).to(weight.dtype) if needs_dw else None
        return dx.to(x2.dtype), dw
    dy2, x2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (dy2, x2))  # the kernel steps rows only
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    block, per_program, warps = _launch_shape(n, x2.device)
    programs = max(1, triton.cdiv(rows, per_program))
    if needs_dw:  # a few programs per SM loop over the rows, each summing its dw partial
        programs = min(programs, num_programs_for_reduction(x2.device))
    partial = torch.empty((programs, n) if needs_dw else (1, 1), dtype=torch.float32, device=x2.device)
    if rows > 0:
        _rmsnorm_backward[(programs,)](
            dy2, x2, weight, r, dx, partial, dy2.stride(0), x2.stride(0), dx.stride(0), rows, n,
            ROWS=per_program, BLOCK_N=block, HAS_DW=needs_dw, num_warps=warps,
        )  # fmt: skip
    dw = None
    if needs_dw:
        dw = (partial.sum(0) if rows > 0 else torch.zeros(n, device=x2.device)).to(weight.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        y, r = rmsnorm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, r)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, r = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy.reshape(x2.shape), x2, weight, r, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same math in PyTorch, with HF's cast points; autograd derives its backward."""
    x32 = x.to(torch.float32)
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * r).to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)), HF Llama's RMSNorm; Triton where it can run, else the reference."""
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)
