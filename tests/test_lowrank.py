"""LoRA's rank-r products (kernels/lowrank.py) against float64: fp32 accuracy from half inputs."""

import pytest
import torch
from numerics import assert_close_to_fp64

from kernels import lowrank

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, r", [(111, 200, 8), (37, 64, 48), (5, 1000, 64)])
def test_down_and_grad_match_the_fp32_matmul_error(dtype, m, k, r):
    x = torch.randn(m, k, dtype=dtype)
    p = torch.randn(r, k) * 0.05
    u = torch.randn(m, r)
    scale = 0.75
    eager_down = (x.float() @ p.t()) * scale  # what PEFT computes: an fp32 copy of x times fp32 A
    ref_down = (x.double() @ p.double().t()) * scale
    assert_close_to_fp64("down", lowrank.down(x, p, scale), eager_down, ref_down)
    # p given as a transposed view, as for g = D @ B
    pt = p.t().contiguous().t()
    assert_close_to_fp64("down strided", lowrank.down(x, pt, scale), eager_down, ref_down)
    eager_grad = (u.t() @ x.float()) * scale
    ref_grad = (u.double().t() @ x.double()) * scale
    assert_close_to_fp64("grad", lowrank.grad(x, u, scale), eager_grad, ref_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("round_first", [False, True])
def test_up_add_follows_peft_cast_points(dtype, round_first):
    m, n, r = 70, 150, 16
    y = torch.randn(m, n, dtype=dtype)
    u, v = torch.randn(m, r), torch.randn(n, r) * 0.1
    term = (u @ v.t()) * 2.0
    eager = y + term.to(dtype) if round_first else (y.float() + term).to(dtype)
    ref = y.double() + (u.double() @ v.double().t()) * 2.0
    ours = lowrank.up_add_(y.clone(), u, v, 2.0, round_first=round_first)
    assert_close_to_fp64("up_add", ours, eager, ref)


def test_up_add_on_a_column_slice_leaves_the_rest():
    y = torch.randn(20, 48, dtype=torch.bfloat16)
    before = y.clone()
    u, v = torch.randn(20, 8), torch.randn(16, 8)
    lowrank.up_add_(y[:, 16:32], u, v)
    assert torch.equal(y[:, :16], before[:, :16]) and torch.equal(y[:, 32:], before[:, 32:])
    assert not torch.equal(y[:, 16:32], before[:, 16:32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bounds", [(64,), (64, 96), (32, 160)])
def test_segmented_products_are_the_per_segment_ones(dtype, bounds):
    """q, k and v at once: their stacked (M, N) operand cut at `bounds`, one rank-r factor and one
    scale per segment, each segment's result within the fp32 matmul's error."""
    m, n, r = 37, 192, 8
    cuts = [0, *bounds, n]
    count = len(cuts) - 1
    scales = (0.5, 2.0, 1.5)[:count]
    d = torch.randn(m, n, dtype=dtype)  # the stacked gradient
    b = torch.randn(n, r) * 0.05  # the B_i stacked along N
    u = torch.randn(m, count * r)  # the u_i side by side
    g = lowrank.down(d, b.t(), scales, bounds)
    db = lowrank.grad(d, u, scales, bounds, rank=r)
    y = torch.randn(m, n, dtype=dtype)
    y_ours = lowrank.up_add_(y.clone(), u, b, scales, bounds=bounds)
    for i, (lo, hi, s) in enumerate(zip(cuts, cuts[1:], scales)):
        ui, cols = u[:, i * r : (i + 1) * r], slice(i * r, (i + 1) * r)
        assert_close_to_fp64(
            f"down seg {i}",
            g[:, cols],
            (d[:, lo:hi].float() @ b[lo:hi]) * s,
            (d[:, lo:hi].double() @ b[lo:hi].double()) * s,
        )
        assert_close_to_fp64(
            f"grad seg {i}",
            db[:, lo:hi],
            (ui.t() @ d[:, lo:hi].float()) * s,
            (ui.double().t() @ d[:, lo:hi].double()) * s,
        )
        term = (ui @ b[lo:hi].t()) * s
        assert_close_to_fp64(
            f"up_add seg {i}",
            y_ours[:, lo:hi],
            (y[:, lo:hi].float() + term).to(dtype),
            y[:, lo:hi].double() + (ui.double() @ b[lo:hi].double().t()) * s,
        )


def test_segments_that_cut_a_block_are_refused():
    d, u = torch.randn(8, 100), torch.randn(8, 16)
    with pytest.raises(ValueError):
        lowrank.grad(d, u, 1.0, (50,), rank=8)
    with pytest.raises(ValueError):
        lowrank.down(d, torch.randn(8, 100), (1.0, 2.0), (50, 40))  # out of order
