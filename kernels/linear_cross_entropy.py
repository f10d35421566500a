"""lm_head + cross-entropy, fused: the loss and its gradients without the full logits.

Math, for token t with hidden row x_t, weight W (V x H, row w_v), label y_t and model dtype d,
with Hugging Face's cast points (`lm_head` in d, then `ForCausalLMLoss` does `logits.float()`):

    r_tv = d(x_t . w_v)                      the lm_head logits, rounded to d as F.linear gives
    z_tv = f(float32(r_tv))                  f(r) = r, or with the options (later architectures)
                                             f(r) = c tanh(a r / c)   (logit scale a, soft-cap c)
    lse_t = log sum_v exp(z_tv)              online over vocabulary tiles; exp in fp32,
                                             the sum and the log in fp64
    l_t   = lse_t - z_t,y_t                  fp64; 0 where y_t = ignore_index (-100)
    L     = fp32(s sum_t l_t)                s = 1/n (mean over the n non-ignored tokens),
                                             1/N (num_items_in_batch = N), or 1 (sum)

Why fp64 there: the loss is a single number, and verification holds it to twice eager's error
against float64; PyTorch's CPU nll_loss already sums the tokens in double, and a scalar's
rounding is luck, so we keep every l_t and their sum in fp64 and round L once. It costs one
fp64 FMA per logit, hidden under the memory traffic. p = exp(z - lse) uses lse as an fp32
pair hi + lo, so lse's own fp32 rounding does not scale every p.

Backward, by hand. With p_tv = exp(z_tv - lse_t) = softmax(z_t)_v:

    dl_t / dz_tv = p_tv - [v = y_t]           (d lse / dz_v = p_v; d z_y / dz_v = [v = y])
    dz_tv / dr_tv = f'(r) = a (1 - tanh^2(a r / c)), or a, or 1
    G_tv = dL / dr_tv = s (p_tv - [v = y_t]) f'(r_tv)       zero rows for ignored tokens
    dL/dx_t = sum_v G_tv w_v = (G W)_t          dL/dW = G^T X

HF's backward rounds G to d where `.float()` was applied, so G is stored in d (in place over the
chunk's logits, which are not needed after it) and both GEMMs read it in d, accumulating in
fp32, exactly as F.linear's backward does. The loss is the last op of the model, and L is
linear in the incoming gradient g, so G (hence dx and dW) is formed in the forward pass and
backward only scales: dx = d(g (G W)), dW = d(g (G^T X)). (G W) and (G^T X) are kept in fp32,
so each is rounded to d once, like HF's. With g = 1 (loss.backward(), and the mean or the
num_items_in_batch reduction) our G is HF's bit for bit. Otherwise HF rounds d(g s (p - onehot))
where we round d(s (p - onehot)) and multiply by g after the GEMM: the same number of roundings,
but their size depends on the mantissas of the rounded values (the -s entries at the labels
dominate), so for a given s and g either side can be up to ~1.4x the other; on average equal.

Chunks: tokens are processed C rows at a time, C set by a memory budget for a chunk's logits
(`chunk_rows`; a tail of fewer than 16 rows joins the chunk before it). Per chunk: logits = x_c W^T (cuBLAS, d), one Triton program per row computes
lse and the loss in one pass over vocabulary tiles and G in a second (written over the
logits), then dx_c = G_c W and dW += G_c^T x_c (cuBLAS, fp32 accumulator). Online log-sum-exp,
per lane j of a tile (one exp per element; m starts at -FLT_MAX, S at 0):

    z > m:  S <- S exp(m - z) + 1,  m <- z          else  S <- S + exp(z - m)
    lse = M + log sum_j S_j exp(m_j - M),  M = max_j m_j        (S, and this sum, in fp64)

A batch whose labels are all ignore_index: HF's mean is 0/0 = nan there; we return loss 0 with
zero gradients (n is clamped to 1), so one fully masked micro-batch does not poison training.
With num_items_in_batch the division is HF's own (sum / N). A label outside [0, V) that is not
ignore_index gives a nan loss (the Triton path; no device assert), where PyTorch raises.

Soft-capping and logit scale are applied in fp32 after the upcast (scale first, then cap).
Gemma-2 in HF caps in the model dtype before `.float()`; a pattern for it must decide where to
round. tanh is computed in fp64 from exp (the interpreter has no libdevice, and
(1 - e)/(1 + e) in fp32 loses digits for small arguments).

Memory traffic (T tokens, V vocabulary, H hidden, b bytes per element of d, C rows a chunk):
the logits GEMM writes T V b; the row kernel reads T V b twice and writes G over it (T V b);
the dx GEMM reads G (T V b) and writes T H 4; the dW GEMM reads G and reads and writes the fp32
accumulator, 8 V H bytes per chunk; W (V H b) is read by each GEMM of each chunk. Eager HF
writes the d logits, an fp32 copy, log-softmax, and in backward an fp32 and a d gradient:
about 6 T V-sized tensors where we move 5 of size T V b and keep none. Peak extra memory:
C V b (the chunk) + T H 4 (+ V H 4 with a trainable W), against eager's T V (b + 4 + 4).
Saved for backward: the fp32 dx and dW only; eager keeps the fp32 log-softmax (T V 4).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.runtime import use_triton

IGNORE_INDEX = -100
# A chunk's fp32 logits may take as many bytes as the fp32 copy of the hidden states, but at
# least this many on a GPU (2048 rows of a 128k vocabulary, a 512 MiB bf16 buffer): each GEMM
# then runs at full rate, and the fp32 dW accumulator that the dW GEMM reads and writes once
# per chunk (8 V H bytes) stays under its arithmetic (4 C V H flops; C >= ~1000 on an H200).
# On the CPU small chunks cost nothing.
MIN_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 16 << 20}
FREE_MEMORY_FRACTION = 8  # and at most 1/8 of the free memory
MIN_ROWS = 16


@triton.jit
def _transform(r, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = f(r) and f'(r) for fp32 r."""
    z = r
    slope = tl.full(r.shape, 1.0, tl.float32)
    if HAS_SCALE:
        z = z * logit_scale
        slope = slope * logit_scale
    if HAS_SOFTCAP:
        u = (z / softcap).to(tl.float64)
        e = tl.exp(-2.0 * tl.abs(u))
        t = ((1.0 - e) / (1.0 + e)).to(tl.float32)
        t = tl.where(u < 0, -t, t)
        z = softcap * t
        slope = slope * ((1.0 - t) * (1.0 + t))
    return z, slope


@triton.jit
def _loss_and_grad_rows(
    LOGITS,  # (C, V) in the model dtype: read, then overwritten with G
    LABELS,  # (C,) int64
    LOSS,  # (C,) fp64 per-token loss
    SCALE,  # () fp32: s, the reduction's factor
    stride_row,
    V,
    ignore_index,
    logit_scale,
    softcap,
    BLOCK_V: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(LOGITS.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            tl.store(ptr + start + cols, zero, mask=start + cols < V)
        tl.store(LOSS + row, 0.0)
    else:
        # m starts at -FLT_MAX, not -inf: masked lanes (z = -inf) then give exp(-inf) = 0, never nan.
        # S is summed in fp64: the loss is one number, judged against float64 (see the docstring).
        m = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
        s = tl.zeros([BLOCK_V], dtype=tl.float64)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            r = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = _transform(r, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            e = tl.exp(-tl.abs(z - m)).to(tl.float64)  # exp(m - z) where z > m, else exp(z - m)
            s = tl.where(z > m, s * e + 1.0, s + e)
            m = tl.maximum(m, z)
        row_max = tl.max(m, axis=0)
        lse = row_max.to(tl.float64) + tl.log(tl.sum(s * tl.exp(m - row_max).to(tl.float64), axis=0))
        in_range = (label >= 0) & (label < V)
        r_label = tl.load(ptr + label, mask=in_range, other=float("nan")).to(tl.float32)
        z_label, _ = _transform(r_label, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        tl.store(LOSS + row, lse - z_label.to(tl.float64))
        # p = exp(z - lse) with lse as an fp32 pair hi + lo: no fp32 rounding of lse in p
        lse_hi = lse.to(tl.float32)
        lse_lo = (lse - lse_hi.to(tl.float64)).to(tl.float32)
        scale = tl.load(SCALE)
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            r = tl.load(ptr + c, mask=mask, other=0.0).to(tl.float32)
            z, slope = _transform(r, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            p = tl.exp((z - lse_hi) - lse_lo)
            g = tl.where(c == label, p - 1.0, p)
            if HAS_SCALE or HAS_SOFTCAP:
                g = g * slope
            tl.store(ptr + c, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def _block_and_warps(vocab: int, device: torch.device) -> tuple[int, int]:
    # On a GPU 4096 columns a tile: 16 elements a thread at 8 warps (two 16-byte loads of bf16).
    # The interpreter pays per tile, not per element: larger tiles.
    cap = 4096 if device.type == "cuda" else 32768
    block = min(cap, triton.next_power_of_2(vocab))
    return block, min(8, max(1, block // 512))


def _loss_and_grad_triton(logits, labels, loss, scale, opts: Options) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    block, warps = _block_and_warps(vocab, logits.device)
    _loss_and_grad_rows[(rows,)](
        logits,
        labels,
        loss,
        scale,
        logits.stride(0),
        vocab,
        opts.ignore_index,
        1.0 if opts.logit_scale is None else float(opts.logit_scale),
        1.0 if opts.softcap is None else float(opts.softcap),
        BLOCK_V=block,
        HAS_SCALE=opts.logit_scale is not None,
        HAS_SOFTCAP=opts.softcap is not None,
        num_warps=warps,
    )


def _transform_torch(r: torch.Tensor, opts: Options) -> tuple[torch.Tensor, torch.Tensor | None]:
    slope = None
    if opts.logit_scale is not None:
        r = r * opts.logit_scale
        slope = torch.full_like(r, opts.logit_scale)
    if opts.softcap is not None:
        t = torch.tanh(r.double() / opts.softcap).float()
        r = opts.softcap * t
        cap_slope = (1 - t) * (1 + t)
        slope = cap_slope if slope is None else slope * cap_slope
    return r, slope


def _loss_and_grad_torch(logits, labels, loss, scale, opts: Options) -> None:
    """The row kernel's math in PyTorch (the CPU path without Triton): chunk-sized temporaries."""
    z, slope = _transform_torch(logits.float(), opts)
    row_max = z.max(dim=-1, keepdim=True).values
    lse = row_max.double() + torch.exp(z - row_max).sum(-1, keepdim=True, dtype=torch.float64).log()
    valid = labels != opts.ignore_index
    safe = torch.where(valid, labels, 0)[:, None]
    loss.copy_(torch.where(valid, (lse - z.gather(1, safe).double())[:, 0], 0.0))
    lse_hi = lse.float()
    g = z.sub_(lse_hi).sub_((lse - lse_hi.double()).float()).exp_()
    g.scatter_add_(1, safe, -torch.ones_like(safe, dtype=g.dtype))
    if slope is not None:
        g.mul_(slope)
    g.mul_(torch.where(valid, scale, 0.0)[:, None])
    logits.copy_(g)


@dataclass(frozen=True)
class Options:
    ignore_index: int = IGNORE_INDEX
    reduction: str = "mean"  # "mean" or "sum"; with num_items_in_batch: sum / num_items_in_batch
    logit_scale: float | None = None
    softcap: float | None = None
    chunk_bytes: int | None = None  # budget for one chunk's fp32 logits; None: chunk_rows decides


def default_chunk_bytes(tokens: int, hidden: int, device: torch.device) -> int:
    """The budget for one chunk's fp32 logits: the fp32 size of the hidden states, at least
    MIN_CHUNK_BYTES, at most 1/FREE_MEMORY_FRACTION of the memory that is free."""
    budget = max(tokens * hidden * 4, MIN_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _available_host_memory()
    return min(budget, free // FREE_MEMORY_FRACTION)


def _available_host_memory() -> int:
    """MemAvailable (free plus reclaimable cache) where /proc/meminfo has it, else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def chunk_rows(tokens: int, hidden: int, vocab: int, device: torch.device, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk: as many as the budget holds of fp32 logits rows, a multiple of 128
    when that many fit (GEMM tiles), at least MIN_ROWS (one MMA tile; and the CPU's BLAS
    sums a GEMM of fewer rows less accurately), at most `tokens`."""
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(tokens, hidden, device)
    rows = max(MIN_ROWS, chunk_bytes // (vocab * 4))
    if rows >= 128:
        rows -= rows % 128
    return max(1, min(rows, tokens))


def chunks(tokens: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk; a tail shorter than MIN_ROWS joins the chunk before it."""
    starts = list(range(0, tokens, rows))
    if len(starts) > 1 and tokens - starts[-1] < MIN_ROWS:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else tokens) for i, start in enumerate(starts)]


def _mm_out_dtype_supported() -> bool:
    """torch.mm / torch.addmm with out_dtype (fp16/bf16 operands, fp32 result) exist from 2.8."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


_MM_OUT_DTYPE = {"cuda": _mm_out_dtype_supported()}


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """out (+)= a @ b with a, b in the model dtype and out the fp32 (fp64) accumulator: the
    products are exact and summed in out's dtype, as cuBLAS does for d inputs, then kept
    unrounded. On CUDA through out_dtype; on the CPU by upcasting the operands (exact)."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda and _MM_OUT_DTYPE["cuda"]:
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError) as exc:
            _MM_OUT_DTYPE["cuda"] = False
            warnings.warn(
                f"graft: GEMM with out_dtype failed ({exc}); rounding each chunk's product to {a.dtype}", stacklevel=2
            )
            _matmul_into(out, a, b, accumulate=accumulate)
    elif a.is_cuda:  # older torch: one rounding to d per chunk
        if accumulate:
            out.add_(a @ b)
        else:
            out.copy_(a @ b)
    else:
        a, b = a.to(out.dtype), b.to(out.dtype)
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)


def _reduction_scale(labels: torch.Tensor, opts: Options, num_items_in_batch) -> tuple[torch.Tensor, object]:
    """(s as a 0-d fp32 tensor on the device, the divisor of the summed loss). No host sync."""
    if num_items_in_batch is not None:
        divisor = num_items_in_batch
        if torch.is_tensor(divisor):
            divisor = divisor.to(labels.device)
        one = torch.ones((), dtype=torch.float32, device=labels.device)
        return one / divisor, divisor
    if opts.reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=labels.device), 1
    count = (labels != opts.ignore_index).sum().clamp_min(1).to(torch.float32)
    return 1.0 / count, count


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        num_items_in_batch,
        opts: Options,
        triton_rows: bool,
    ) -> torch.Tensor:
        vocab, h = weight.shape
        x = hidden.reshape(-1, h)
        y = labels.reshape(-1)
        x = x if x.is_contiguous() else x.contiguous()
        y = y if y.is_contiguous() else y.contiguous()
        tokens = x.shape[0]
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dx = torch.empty((tokens, h), dtype=acc, device=x.device) if want_dx else None
        dw = torch.zeros((vocab, h), dtype=acc, device=x.device) if want_dw else None
        # The CPU upcasts the weight once for the dx GEMMs (see _matmul_into).
        w_for_dx = weight if (x.is_cuda or weight.dtype == acc or not want_dx) else weight.to(acc)
        losses = torch.empty(tokens, dtype=torch.float64, device=x.device)
        scale, divisor = _reduction_scale(y, opts, num_items_in_batch)
        spans = chunks(tokens, chunk_rows(tokens, h, vocab, x.device, opts.chunk_bytes))
        buffer = torch.empty((max((e - s for s, e in spans), default=0), vocab), dtype=x.dtype, device=x.device)
        step = _loss_and_grad_triton if triton_rows else _loss_and_grad_torch
        for start, end in spans:
            x_c = x[start:end]
            logits = buffer[: end - start]
            torch.mm(x_c, weight.t(), out=logits)  # = F.linear(x_c, weight): HF's lm_head
            step(logits, y[start:end], losses[start:end], scale, opts)  # logits now hold G
            if want_dx:
                _matmul_into(dx[start:end], logits, w_for_dx, accumulate=False)
            if want_dw:
                _matmul_into(dw, logits.t(), x_c, accumulate=True)
        ctx.save_for_backward(dx, dw)
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        return (losses.sum() / divisor).to(torch.float32)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        dx, dw = ctx.saved_tensors
        if dx is not None:
            dx = (dx * grad_loss).to(ctx.hidden_dtype).view(ctx.hidden_shape)
        if dw is not None:
            dw = (dw * grad_loss).to(ctx.weight_dtype)
        return dx, dw, None, None, None, None


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch=None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Eager: HF's lm_head and loss (F.linear in d, `.float()`, cross_entropy), the full logits;
    autograd derives the backward. Its mean over an all-ignored batch is nan, as HF's is."""
    logits = F.linear(hidden, weight).float()
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.reshape(-1, weight.shape[0])
    reduce = "sum" if num_items_in_batch is not None else reduction
    loss = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction=reduce)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """cross_entropy(float(hidden @ weight^T), labels) without materialising the logits.

    hidden (..., H) and weight (V, H) in one float dtype; labels (...) int64, already aligned
    with hidden (shifted for causal LM). Returns the fp32 loss: the mean over non-ignored
    tokens (0 if there are none), the sum, or the sum / num_items_in_batch when that is given.
    The per-row step runs in Triton where it can (GPU, or the interpreter), else in PyTorch;
    the GEMMs are torch.mm (cuBLAS) either way."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    opts = Options(ignore_index, reduction, logit_scale, softcap, chunk_bytes)
    labels = labels.to(hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, labels, num_items_in_batch, opts, use_triton(hidden, weight, labels)
        )
