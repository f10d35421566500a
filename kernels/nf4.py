"""Dequantization of bitsandbytes 4-bit weights (NF4 and FP4), bit-exact with bitsandbytes.

API: `Nf4Weight.from_quant_state(packed, quant_state)` (or `.from_param(Linear4bit.weight)`) reads
a bitsandbytes QuantState into plain tensors and ints (no bitsandbytes import);
`dequantize(weight, out=None)` returns the (out, in) weight in quant_state.dtype, into `out` when
given; `dequantize_4bit(packed, quant_state, out=None)` is the drop-in for bitsandbytes'
function; `unsupported_reason(packed, quant_state)` is the guard. `matmul_4bit` (below) is the
fused product; it is slower than dequantize + cuBLAS at training sizes.

Layout (bitsandbytes 0.50.2, `quantize_4bit` / `Params4bit`): the weight of shape S (n = prod(S)
values) is flattened row-major and cut into blocks of `blocksize` consecutive values (32, 64,
..., 4096; blocks run across row ends when S[-1] % blocksize != 0). Value i is the 4-bit code
in byte i // 2 of the packed buffer: the HIGH nibble for even i, the low nibble for odd i (an
odd n leaves the last low nibble unused). The packed buffer is uint8, or another dtype
(`quant_storage`) whose bytes are the same.

    w[i] = dtype( CODE[nibble(i)] * absmax[i // blocksize] )      one fp32 multiply, one rounding

CODE is bitsandbytes' 16-entry fp32 table (NF4: normal quantiles; FP4: the 1-2-1 float codes
divided by 12 in fp32, -0.0 at code 8 as CUDA makes it); the rounding to bf16/fp16 is to
nearest even. With double quantization (`quant_state.nested`) absmax itself is stored as uint8 codes q into the
256-entry fp32 table `state2.code`, scaled per block of `state2.blocksize` (256) block scales,
and bitsandbytes adds the mean it subtracted before quantizing:

    absmax[b] = fp32( fp32(code2[q[b]] * absmax2[b // 256]) + offset )    multiply, round, add, round

These are the CUDA kernels' operations (kDequantizeBlockwise: `lut[nibble] * absmax` in fp32,
then the conversion to T) and functional.dequantize_4bit's (`dequantize_blockwise(...)` then
`absmax += offset` as a separate fp32 add). A fused multiply-add would round once instead of
twice, so the kernel is launched with `enable_fp_fusion=False`.

Differences inside bitsandbytes 0.50.2 itself (measured on CPU, AVX512):
- Its CPU kernel indexes absmax per row (`absmax[row * (n_cols / blocksize) + ...]`) on its
  AVX512 path, which is wrong when S[-1] % blocksize != 0 (e.g. 37 x 192 at blocksize 128):
  there it disagrees with its own CUDA kernel, its pure-PyTorch backend and its quantizer.
  We follow the flat-block layout that bitsandbytes quantizes with.
- FP4 code 8 is -0.0 in its CUDA kernel (`lut[0] * sign`) but +0.0 in its Python table
  (`get_4bit_type` writes it as the int literal -0) and so in its CPU paths. We follow CUDA;
  the values are equal (torch.equal does not tell them apart) and so is every product with them.

No backward: the 4-bit weight is frozen. Memory traffic for n values written as b-byte floats:
n/2 bytes of codes read, 4 n / blocksize bytes of absmax (nested: n / blocksize bytes of uint8
codes plus 4 n / (256 blocksize) of absmax2), n b bytes written. For bf16 at blocksize 64 that
is 2.5625 bytes per value, 80% of it the write; nested saves 3/64 of a byte per value. The
kernel reads each input once: one program owns whole quantization blocks, so each block's
scale is computed once in registers, never materialised in fp32 in memory.

Measured (H200, benchmarks/bench_nf4.py; bf16, nested nf4, blocksize 64): 3.5-3.6 TB/s on the
Llama-8B MLP shapes (~42 us for 14336 x 4096), 84% of a device-to-device copy's 4.25 TB/s and
above a pure fill's 3.36 TB/s, 1.6-1.9x faster than bitsandbytes' dequantize_4bit; bit-exact
with its CUDA kernel on 145 configurations. Small weights (1024 x 4096) are launch-bound (~8 us).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.runtime import INTERPRET, use_triton

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# bitsandbytes.functional.get_4bit_type's tables, built the same way (fp32 literals; FP4 divided
# by its largest magnitude, 12, in fp32), so they are bit-identical to the CUDA kernels' tables,
# FP4's -0.0 included (get_4bit_type has +0.0 there).
_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
_CODE_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 values a 4-bit code stands for (before scaling by its block's absmax)."""
    device = torch.device(device)
    key = (quant_type, device)
    if key not in _CODE_CACHE:
        if quant_type == "nf4":
            table = torch.tensor(_NF4, dtype=torch.float32)
        elif quant_type == "fp4":
            table = torch.tensor(_FP4, dtype=torch.float32)
            table = table / table.abs().max()
        else:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        _CODE_CACHE[key] = table.to(device)
    return _CODE_CACHE[key]


@dataclass(frozen=True)
class Nf4Weight:
    """A bitsandbytes 4-bit weight (NF4 or FP4) as plain tensors and ints: what the kernel reads.

    Holds references to bitsandbytes' tensors, no copies: build it where it is used (it is
    cheap and does not synchronise), or rebuild it after the module moves device."""

    packed: torch.Tensor  # uint8, contiguous, ceil(n / 2) bytes or more (any shape)
    absmax: torch.Tensor  # fp32 per block; uint8 codes when nested
    blocksize: int
    quant_type: str  # "nf4" | "fp4"
    dtype: torch.dtype  # of the dequantized weight
    shape: tuple[int, ...]
    nested_code: torch.Tensor | None = None  # fp32 (256,)
    nested_absmax: torch.Tensor | None = None  # fp32, one per nested_blocksize blocks
    nested_blocksize: int = 0
    nested_offset: torch.Tensor | None = None  # fp32, one element (0-d)

    @property
    def nested(self) -> bool:
        return self.nested_code is not None

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state) -> Nf4Weight:
        """From a Params4bit's data and its `bitsandbytes.functional.QuantState` (read, not imported).
        Raises ValueError with the reason when the state is not one this kernel reproduces."""
        reason = unsupported_reason(packed, quant_state)
        if reason is not None:
            raise ValueError(reason)
        qs = quant_state
        nested = {}
        if qs.nested:
            s2 = qs.state2
            nested = dict(
                nested_code=s2.code,
                nested_absmax=s2.absmax,
                nested_blocksize=s2.blocksize,
                nested_offset=qs.offset,
            )
        return cls(
            # The kernel indexes raw bytes: only dtype matters, not shape ((n + 1) // 2, 1).
            packed=packed if packed.dtype == torch.uint8 else packed.view(torch.uint8),
            absmax=qs.absmax if qs.nested or qs.absmax.dtype == torch.float32 else qs.absmax.float(),
            blocksize=qs.blocksize,
            quant_type=qs.quant_type,
            dtype=qs.dtype,
            shape=tuple(qs.shape),
            **nested,
        )

    @classmethod
    def from_param(cls, weight) -> Nf4Weight:
        """From a `bitsandbytes.nn.Params4bit` (e.g. `Linear4bit.weight`)."""
        return cls.from_quant_state(weight.data, weight.quant_state)


def unsupported_reason(packed: torch.Tensor, quant_state) -> str | None:
    """Why this packed weight and QuantState cannot be dequantized here, or None: for guards."""
    qs = quant_state
    for attr in ("absmax", "blocksize", "quant_type", "dtype", "shape", "nested"):
        if not hasattr(qs, attr):
            return f"quant_state has no {attr!r}: not a bitsandbytes 4-bit QuantState"
    if qs.quant_type not in ("nf4", "fp4"):
        return f"quant_type {qs.quant_type!r} is not nf4/fp4"
    if qs.blocksize not in BLOCKSIZES:
        return f"blocksize {qs.blocksize} is not one of {BLOCKSIZES}"
    if qs.dtype not in DTYPES:
        return f"dtype {qs.dtype} is not bf16/fp16/fp32"
    if qs.shape is None:
        return "quant_state has no shape"
    n = 1
    for size in qs.shape:
        n *= int(size)
    if not packed.is_contiguous():
        return "packed weight is not contiguous"
    if packed.numel() * packed.element_size() < (n + 1) // 2:
        return f"packed weight holds {packed.numel() * packed.element_size()} bytes, {(n + 1) // 2} needed"
    blocks = -(-n // qs.blocksize)
    if qs.absmax.numel() < blocks:
        return f"absmax has {qs.absmax.numel()} values, {blocks} blocks"
    tensors = [packed, qs.absmax]
    if qs.nested:
        s2 = qs.state2
        if qs.absmax.dtype != torch.uint8:
            return f"nested absmax is {qs.absmax.dtype}, not uint8 codes"
        if s2.code.dtype != torch.float32 or s2.code.numel() != 256:
            return "nested code table is not 256 fp32 values"
        if s2.absmax.dtype != torch.float32 or s2.absmax.numel() < -(-blocks // s2.blocksize):
            return "nested absmax is not fp32 with one value per nested block"
        if s2.blocksize not in BLOCKSIZES:
            return f"nested blocksize {s2.blocksize} is not a power of two in {BLOCKSIZES}"
        if qs.offset is None or qs.offset.numel() != 1 or qs.offset.dtype != torch.float32:
            return "nested quant_state has no fp32 scalar offset"
        tensors += [s2.code, s2.absmax, qs.offset]
    elif not qs.absmax.is_floating_point():
        return f"absmax is {qs.absmax.dtype}, not floating point"
    if len({t.device for t in tensors}) != 1:
        return "quant_state tensors are on different devices"
    return None


@triton.jit
def _dequantize_4bit_kernel(
    PACKED,
    ABSMAX,
    CODE,
    NESTED_CODE,
    NESTED_ABSMAX,
    NESTED_OFFSET,
    OUT,
    OUT_PAIRS,
    n_out,
    n_bytes,
    n_pairs,
    n_blocks,
    row_pairs,
    gap_pairs,
    BLOCKSIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    EVEN: tl.constexpr,
    ODD: tl.constexpr,
    ROW_GAP: tl.constexpr,
):
    # One program owns BLOCKS_PER_PROGRAM whole quantization blocks: a (blocks, bytes) tile of
    # codes, one scale per tile row. The two values of a byte are packed into one 2x-wide integer
    # (the high nibble's value at the lower address, little-endian) and stored through OUT_PAIRS,
    # OUT viewed as int32 (int64 for fp32): each thread stores the values of the bytes it loaded,
    # 16-byte stores with no interleaving shuffle through shared memory. Bases are int64.
    # With ROW_GAP, OUT's rows are `gap_pairs` pairs longer than the weight's (`row_pairs`): the
    # first columns of a wider buffer (the LoRA fold's extra columns follow each row).
    HALF: tl.constexpr = BLOCKSIZE // 2
    first_block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM
    rows = tl.arange(0, BLOCKS_PER_PROGRAM)
    byte_offs = first_block * HALF + (rows[:, None] * HALF + tl.arange(0, HALF)[None, :])
    block_ids = first_block + rows

    if EVEN:
        codes = tl.load(PACKED + byte_offs)
    else:
        codes = tl.load(PACKED + byte_offs, mask=byte_offs < n_bytes, other=0)
    if NESTED:
        q = tl.load(ABSMAX + block_ids, mask=block_ids < n_blocks, other=0).to(tl.int32)
        scale2 = tl.load(NESTED_ABSMAX + block_ids // NESTED_BLOCKSIZE, mask=block_ids < n_blocks, other=0.0)
        scale = tl.load(NESTED_CODE + q) * scale2  # rounded to fp32 here, then the offset added
        scale = scale + tl.load(NESTED_OFFSET)
    else:
        scale = tl.load(ABSMAX + block_ids, mask=block_ids < n_blocks, other=0.0)

    dtype = OUT.dtype.element_ty
    high = (tl.load(CODE + (codes >> 4).to(tl.int32)) * scale[:, None]).to(dtype)
    low = (tl.load(CODE + (codes & 0xF).to(tl.int32)) * scale[:, None]).to(dtype)
    if VALUE_BITS == 16:
        high_bits = high.to(tl.uint16, bitcast=True).to(tl.uint32)
        low_bits = low.to(tl.uint16, bitcast=True).to(tl.uint32)
        pairs = ((low_bits << 16) | high_bits).to(tl.int32, bitcast=True)
    else:
        high_bits = high.to(tl.uint32, bitcast=True).to(tl.uint64)
        low_bits = low.to(tl.uint32, bitcast=True).to(tl.uint64)
        pairs = ((low_bits << 32) | high_bits).to(tl.int64, bitcast=True)
    store_offs = byte_offs + (byte_offs // row_pairs) * gap_pairs if ROW_GAP else byte_offs
    if EVEN:
        tl.store(OUT_PAIRS + store_offs, pairs)
    else:
        tl.store(OUT_PAIRS + store_offs, pairs, mask=byte_offs < n_pairs)
    if ODD:  # n is odd: the last byte holds one value, in its high nibble
        tl.store(OUT + byte_offs * 2, high, mask=byte_offs * 2 == n_out - 1)


# Values per program: 8192 on a GPU (4 KiB of codes in, 16 KiB of bf16 out; 4 warps give each
# thread 32 bytes of codes and 64 values). The interpreter runs one Python loop per program,
# so there it takes far larger tiles.
_TILE = 1 << 17 if INTERPRET else 8192
_WARPS = 4
_PAIR_DTYPE = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def _check_out(weight: Nf4Weight, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if tuple(out.shape) != weight.shape or out.dtype != weight.dtype or out.device != weight.device:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} on {out.device}, "
            f"needs {weight.shape} {weight.dtype} on {weight.device}"
        )
    if not out.is_contiguous() and not _row_strided_pairs(out):
        raise ValueError("out must be contiguous, or 2-D with unit column stride and even row length and stride")
    if out.data_ptr() % (2 * out.element_size()):
        raise ValueError("out must be aligned to two values (the kernel stores value pairs)")
    return out


def _row_strided_pairs(out: torch.Tensor) -> bool:
    """out is the first columns of a wider row-major buffer, in whole value pairs."""
    return out.dim() == 2 and out.stride(1) == 1 and out.shape[1] % 2 == 0 and out.stride(0) % 2 == 0


def dequantize_triton(weight: Nf4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    out = _check_out(weight, out)
    n = weight.numel
    if n == 0:
        return out
    tile = max(_TILE, weight.blocksize)
    blocks_per_program = tile // weight.blocksize
    n_blocks = -(-n // weight.blocksize)
    code = code_table(weight.quant_type, weight.device)
    nested = weight.nested
    gap = 0 if out.is_contiguous() else out.stride(0) - out.shape[1]
    flat = out.view(-1) if not gap else out.as_strided((out.shape[0] * out.stride(0) - gap,), (1,))
    pairs = flat[: n - n % 2 if not gap else flat.numel()].view(_PAIR_DTYPE[weight.dtype])
    _dequantize_4bit_kernel[(triton.cdiv(n_blocks, blocks_per_program),)](
        weight.packed,
        weight.absmax,
        code,
        weight.nested_code if nested else code,
        weight.nested_absmax if nested else code,
        weight.nested_offset if nested else code,
        flat,
        pairs,
        n,
        (n + 1) // 2,
        n // 2,
        n_blocks,
        max(1, out.shape[-1] // 2),
        gap // 2,
        BLOCKSIZE=weight.blocksize,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=nested,
        NESTED_BLOCKSIZE=weight.nested_blocksize if nested else 1,
        VALUE_BITS=8 * out.element_size(),
        EVEN=n % tile == 0,
        ODD=n % 2 == 1,
        ROW_GAP=gap > 0,
        num_warps=_WARPS,
        enable_fp_fusion=False,
    )
    return out


def dequantize_reference(weight: Nf4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The same math in PyTorch: fp32 products (and the nested add) rounded once to the dtype."""
    out = _check_out(weight, out)
    n = weight.numel
    if n == 0:
        return out
    absmax = weight.absmax.reshape(-1)
    if weight.nested:
        blocks = torch.arange(absmax.numel(), device=absmax.device) // weight.nested_blocksize
        absmax = weight.nested_code[absmax.long()] * weight.nested_absmax.reshape(-1)[blocks]
        absmax = absmax + weight.nested_offset  # a separate fp32 add, as bitsandbytes does
    codes = weight.packed.reshape(-1)[: (n + 1) // 2]
    nibbles = torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(-1)[:n].long()
    scale = absmax.repeat_interleave(weight.blocksize)[:n]
    values = code_table(weight.quant_type, weight.device)[nibbles] * scale
    out.copy_(values.view(weight.shape))
    return out


def dequantize(weight: Nf4Weight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The full weight in weight.dtype and weight.shape; into `out` when given (reuse one buffer
    per layer shape). Triton where it can run, else the PyTorch reference of the same math."""
    tensors = [weight.packed, weight.absmax] + ([out] if out is not None else [])
    if use_triton(*tensors):
        return dequantize_triton(weight, out)
    return dequantize_reference(weight, out)


def dequantize_4bit(packed: torch.Tensor, quant_state, out: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for `bitsandbytes.functional.dequantize_4bit(packed, quant_state)`, bit-exact."""
    return dequantize(Nf4Weight.from_quant_state(packed, quant_state), out)


# ---------------------------------------------------------------------------------------------
# x @ W^T and x @ W with W dequantized tile by tile on chip (never a full W in memory).
#
# Speed (H200, Llama-8B shapes, 4096 tokens, bf16, nested nf4): about 270 TFLOP/s for x @ W^T
# and 255 for x @ W, against about 650 for bitsandbytes' dequantize + cuBLAS and 700 for cuBLAS
# alone: the per-value table lookups on the CUDA cores, serialised with the tensor-core work in
# one warpgroup, cost more than the 2n-byte W round trip they save. For training-sized M use
# `dequantize` (into a reused buffer) + torch.matmul; this op is for when memory is what counts.
#
# Math: out = x @ W^T (transpose=False, the forward; x (M, K) -> (M, N)) or out = x @ W
# (transpose=True, the backward's dx; x (M, N) -> (M, K)) for W (N, K) = dequantize(weight),
# each W tile rounded to W's dtype exactly as `dequantize` does, products accumulated in fp32,
# rounded once to x's dtype: the same roundings as eager's x @ dequantize(W).T, differing only
# in the summation order. Traffic: x and out once per tile column/row of the grid (as any
# GEMM), the 4-bit codes instead of a bf16 W: n/2 + scale bytes rather than 2n read, and no
# 2n-byte W written and read back by a separate dequantize.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dequantize_w_tile(
    PACKED,
    ABSMAX,
    NESTED_CODE,
    NESTED_ABSMAX,
    NESTED_OFFSET,
    code,
    n0,
    k0,
    N,
    K,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    dtype: tl.constexpr,
):
    """W[n0:n0+BN, k0:k0+BK] in dtype. A tile row spans BK // SUB quantization blocks (SUB values
    each). Each (row, block) gets its 16 possible values, dtype(code[i] * scale) - the very
    products and roundings of `dequantize` - and each value is picked from those 16 in registers
    (tl.gather), so no per-value global load, multiply or rounding. Needs K % BLOCKSIZE == 0."""
    SUB: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BK else BK
    GROUPS: tl.constexpr = BK // SUB
    n = n0 + tl.arange(0, BN)
    g = tl.arange(0, GROUPS)
    j = tl.arange(0, SUB // 2)
    n_ok = n < N
    k_byte = k0 // 2 + g[:, None] * (SUB // 2) + j[None, :]  # (GROUPS, SUB / 2)
    byte = n.to(tl.int64)[:, None, None] * (K // 2) + k_byte[None, :, :]
    ok = n_ok[:, None, None] & (k_byte < K // 2)[None, :, :]
    codes = tl.load(PACKED + byte, mask=ok, other=0)
    block = n.to(tl.int64)[:, None] * (K // BLOCKSIZE) + (k0 + g * SUB)[None, :] // BLOCKSIZE  # (BN, GROUPS)
    block_ok = n_ok[:, None] & (k0 + g * SUB < K)[None, :]
    if NESTED:
        q = tl.load(ABSMAX + block, mask=block_ok, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + q) * tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=block_ok, other=0.0)
        scale = scale + tl.load(NESTED_OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=block_ok, other=0.0)
    table = (scale[:, :, None] * code[None, None, :]).to(dtype)  # (BN, GROUPS, 16)
    shape: tl.constexpr = (BN, GROUPS, SUB // 2)
    high = tl.gather(table, tl.broadcast_to((codes >> 4).to(tl.int32), shape), axis=2)
    low = tl.gather(table, tl.broadcast_to((codes & 0xF).to(tl.int32), shape), axis=2)
    return tl.reshape(tl.join(high, low), (BN, BK))


@triton.jit
def _matmul_4bit_kernel(
    X,
    PACKED,
    ABSMAX,
    CODE,
    NESTED_CODE,
    NESTED_ABSMAX,
    NESTED_OFFSET,
    OUT,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    IEEE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Forward: out (M, N) tile over (m, n), loop over k. Transposed: out (M, K) tile over (m, k),
    # loop over n. In both, the W tile is (BLOCK_N, BLOCK_K) of W (N, K).
    OUT_COLS = K if TRANSPOSE else N
    OUT_BLOCK: tl.constexpr = BLOCK_K if TRANSPOSE else BLOCK_N
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_c = tl.cdiv(OUT_COLS, OUT_BLOCK)
    group = pid // (GROUP_M * grid_c)  # grouped order: neighbours share W tiles in L2
    first_m = group * GROUP_M
    rows_in_group = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_c)) % rows_in_group
    pid_c = (pid % (GROUP_M * grid_c)) // rows_in_group

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    x_rows = X + m.to(tl.int64)[:, None] * stride_xm
    # Triton's interpreter multiplies bf16 dot operands as their uint16 bit patterns; there we
    # widen them to fp32, which changes nothing else (bf16 products are exact in fp32).
    dtype = tl.float32 if DOT_IN_FP32 else X.dtype.element_ty
    w_dtype = X.dtype.element_ty
    precision: tl.constexpr = "ieee" if IEEE or DOT_IN_FP32 else "tf32"
    code = tl.load(CODE + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, OUT_BLOCK), dtype=tl.float32)
    if TRANSPOSE:
        k0 = pid_c * BLOCK_K
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            x = tl.load(x_rows + n[None, :], mask=m_ok[:, None] & (n < N)[None, :], other=0.0)
            w = _dequantize_w_tile(
                PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, NESTED_OFFSET, code, n0, k0, N, K,
                BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, w_dtype,
            )  # fmt: skip
            acc = tl.dot(x.to(dtype), w.to(dtype), acc, input_precision=precision)
        cols = k0 + tl.arange(0, BLOCK_K)
    else:
        n0 = pid_c * BLOCK_N
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            w = _dequantize_w_tile(
                PACKED, ABSMAX, NESTED_CODE, NESTED_ABSMAX, NESTED_OFFSET, code, n0, k0, N, K,
                BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, w_dtype,
            )  # fmt: skip
            acc = tl.dot(x.to(dtype), tl.trans(w.to(dtype)), acc, input_precision=precision)
        cols = n0 + tl.arange(0, BLOCK_N)
    out = OUT + m.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & (cols < OUT_COLS)[None, :])


def matmul_unsupported_reason(x: torch.Tensor, weight: Nf4Weight) -> str | None:
    """Why matmul_4bit cannot take these operands, or None: for guards (the caller then runs
    dequantize + torch.matmul)."""
    if len(weight.shape) != 2:
        return f"weight shape {weight.shape} is not 2-D"
    if x.dtype != weight.dtype:
        return f"x is {x.dtype} but the weight dequantizes to {weight.dtype}"
    if weight.blocksize < 64:
        return f"blocksize {weight.blocksize} < 64"
    if weight.shape[1] % weight.blocksize:
        return f"in_features {weight.shape[1]} is not a multiple of blocksize {weight.blocksize}"
    if x.device != weight.device:
        return "x and weight are on different devices"
    return None


def _matmul_config(weight: Nf4Weight, transpose: bool) -> dict:
    """128 x 128 output tiles, one warpgroup. Measured on an H200 (Llama-8B shapes, 4096 tokens,
    bf16): 8 warps ran 3x slower (the register table lookups then cross warps), and so did
    wider or deeper tiles."""
    if transpose:  # walks N in 64-row W tiles
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


def matmul_4bit_triton(x: torch.Tensor, weight: Nf4Weight, transpose: bool = False) -> torch.Tensor:
    reason = matmul_unsupported_reason(x, weight)
    if reason is not None:
        raise ValueError(reason)
    n_rows, n_cols = weight.shape
    inner, outer = (n_rows, n_cols) if transpose else (n_cols, n_rows)
    if x.shape[-1] != inner:
        raise ValueError(f"x has {x.shape[-1]} features, the product needs {inner}")
    x2 = x.reshape(-1, inner)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], outer), dtype=x.dtype, device=x.device)
    config = _matmul_config(weight, transpose)
    if INTERPRET:
        config.update(BLOCK_M=32, GROUP_M=2)
    grid_m = triton.cdiv(x2.shape[0], config["BLOCK_M"])
    grid_c = triton.cdiv(outer, config["BLOCK_K"] if transpose else config["BLOCK_N"])
    code = code_table(weight.quant_type, weight.device)
    nested = weight.nested
    if x2.shape[0] > 0:
        _matmul_4bit_kernel[(grid_m * grid_c,)](
            x2,
            weight.packed,
            weight.absmax,
            code,
            weight.nested_code if nested else code,
            weight.nested_absmax if nested else code,
            weight.nested_offset if nested else code,
            out,
            x2.shape[0],
            n_rows,
            n_cols,
            x2.stride(0),
            out.stride(0),
            BLOCKSIZE=weight.blocksize,
            NESTED=nested,
            NESTED_BLOCKSIZE=weight.nested_blocksize if nested else 1,
            TRANSPOSE=transpose,
            IEEE=x.dtype == torch.float32,
            DOT_IN_FP32=INTERPRET and x.dtype == torch.bfloat16,
            enable_fp_fusion=False,
            **config,
        )
    return out.view(*x.shape[:-1], outer)


def matmul_4bit_reference(x: torch.Tensor, weight: Nf4Weight, transpose: bool = False) -> torch.Tensor:
    """Eager: the dequantized W in its dtype, then torch.matmul."""
    w = dequantize_reference(weight).to(x.dtype)
    return x @ (w if transpose else w.t())


def matmul_4bit(x: torch.Tensor, weight: Nf4Weight, transpose: bool = False) -> torch.Tensor:
    """x @ W^T (transpose=False: the forward, x (..., in) -> (..., out)) or x @ W (transpose=True:
    the backward's dx, x (..., out) -> (..., in)) for W = dequantize(weight) of shape (out, in),
    without materialising W. Triton where it can run, else the eager reference."""
    if use_triton(x, weight.packed):
        return matmul_4bit_triton(x, weight, transpose)
    return matmul_4bit_reference(x, weight, transpose)
