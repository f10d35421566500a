"""Error against a float64 reference, and the bound our kernels are held to."""

from __future__ import annotations

import torch

# Our relative error against float64 may be at most FACTOR[dtype] times PyTorch eager's own
# error in the same dtype, plus SLACK unit roundoffs (which matters only where eager happens
# to be exact). In bf16/fp16 we must be no worse than eager. In fp32 both sit near one unit
# roundoff, set by a few roundings per row, and their ratio wanders (up to 1.7x over 150
# seeds for RMSNorm with 4 rows), so there the bound is 2x.
FACTOR = {torch.float32: 2.0, torch.bfloat16: 1.0, torch.float16: 1.0}
SLACK = 1 / 16


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    assert torch.isfinite(value).all(), "non-finite values"
    return ((value.double() - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def assert_close_to_fp64(name: str, ours: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor) -> None:
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    e_ours, e_eager = rel_err(ours, ref64), rel_err(eager, ref64)
    factor = FACTOR[ours.dtype]
    bound = factor * e_eager + SLACK * torch.finfo(ours.dtype).eps / 2
    assert e_ours <= bound, f"{name}: error {e_ours:.3e} > {factor} x eager {e_eager:.3e} (+slack)"
