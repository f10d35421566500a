"""Where a kernel runs: compiled Triton on CUDA, Triton's interpreter on CPU when
``TRITON_INTERPRET=1`` (what the tests use), else the PyTorch reference of the same math."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor can be handed to a Triton kernel on this machine."""
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


def num_programs_for_reduction(device: torch.device) -> int:
    """Programs for a grid that reduces across rows: a few per SM on a GPU (looked up once
    per device: this runs in every backward); on the interpreter every program is a Python
    loop, so few."""
    if device.type == "cuda":
        return 4 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _round_bf16_nearest_even(data: np.ndarray) -> np.ndarray:
    bits = data.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)


def _bf16_as_float32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _interpreter_handles_bf16_like_the_gpu() -> None:
    """Two bf16 gaps of Triton's interpreter (3.x), which stores bf16 as uint16: it casts
    fp32 -> bf16 by truncating the mantissa (the GPU rounds to nearest even), and its tl.dot
    multiplies the uint16 codes as integers. Without this, CPU tests would judge the
    interpreter, not the kernel."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast_impl = getattr(builder, "cast_impl", None)
    create_dot = getattr(builder, "create_dot", None)
    if cast_impl is None or create_dot is None or getattr(cast_impl, "_graft", False):
        return
    import triton.language as tl

    def cast_with_rne(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            return interpreter.TensorHandle(_round_bf16_nearest_even(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def dot_with_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(_bf16_as_float32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(_bf16_as_float32(b.data), tl.float32)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    cast_with_rne._graft = True
    builder.cast_impl = cast_with_rne
    builder.create_dot = dot_with_bf16


if INTERPRET:
    _interpreter_handles_bf16_like_the_gpu()
