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


# Tile and launch configurations of down and grad, each against fp64: the defaults, what shipped
# before, and small tiles that make every program loop over several blocks and leave some splits
# empty (on the interpreter a reduction aims at 4 programs).
CONFIG_CASES = {
    "default": ({}, {}),
    "legacy": (lowrank.LEGACY["down"], lowrank.LEGACY["grad"]),
    "stacked, small tiles": (
        dict(block_m=16, block_k=16, parts="stacked", num_stages=2),
        dict(block_m=16, block_k=16, parts="stacked"),
    ),
    "chained, small tiles": (
        dict(block_m=32, block_k=16, parts="chained"),
        dict(block_m=16, block_k=32, parts="chained", num_warps=8),
    ),
    "narrow and deep tiles": (
        dict(block_m=128, block_k=16),
        dict(block_m=16, block_k=256, parts="chained"),
    ),
    "stacked, wide tiles": (
        dict(block_m=256, block_k=32, parts="stacked", num_warps=8),
        dict(block_m=32, block_k=256, parts="stacked", num_stages=4),
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.parametrize(
    "m, k, r, bounds",
    [(37, 80, 8, ()), (111, 208, 16, ()), (37, 96, 8, (32, 64)), (70, 160, 48, ()), (5, 48, 16, (16,))],
)
def test_configs_match_fp64(case, m, k, r, bounds):
    down_config, grad_config = CONFIG_CASES[case]
    cuts = [0, *bounds, k]
    count = len(cuts) - 1
    scales = (0.75, 2.0, 1.5)[:count] if bounds else 0.75
    each = scales if bounds else (scales,)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    p = torch.randn(r, k) * 0.05
    u = torch.randn(m, count * r)
    g = lowrank.down(x, p, scales, bounds, config=down_config)
    db = lowrank.grad(x, u, scales, bounds, rank=r, config=grad_config)
    assert g.shape == (m, count * r) and db.shape == (r, k)
    for i, (lo, hi, s) in enumerate(zip(cuts, cuts[1:], each)):
        xi, pi, ui = x[:, lo:hi], p[:, lo:hi], u[:, i * r : (i + 1) * r]
        assert_close_to_fp64(
            f"down seg {i}", g[:, i * r : (i + 1) * r], (xi.float() @ pi.t()) * s, (xi.double() @ pi.double().t()) * s
        )
        assert_close_to_fp64(
            f"grad seg {i}", db[:, lo:hi], (ui.t() @ xi.float()) * s, (ui.double().t() @ xi.double()) * s
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_configs_with_exact_dots(dtype):
    """fp16 and fp32 activations take exact fp32 dots whatever the parts setting."""
    x = torch.randn(53, 144, dtype=dtype)
    p, u = torch.randn(16, 144) * 0.05, torch.randn(53, 16)
    config = dict(block_m=16, block_k=32, parts="stacked")
    assert_close_to_fp64("down", lowrank.down(x, p, config=config), x.float() @ p.t(), x.double() @ p.double().t())
    assert_close_to_fp64("grad", lowrank.grad(x, u, config=config), u.t() @ x.float(), u.double().t() @ x.double())


def test_up_add_config():
    y = torch.randn(45, 96, dtype=torch.bfloat16)
    u, v = torch.randn(45, 32), torch.randn(96, 16) * 0.1
    ours = lowrank.up_add_(y.clone(), u, v, (0.5, 2.0), bounds=(32,), config=dict(block_m=16, block_n=32, num_warps=8))
    for lo, hi, ui, s in ((0, 32, u[:, :16], 0.5), (32, 96, u[:, 16:], 2.0)):
        term = (ui @ v[lo:hi].t()) * s
        ref = y[:, lo:hi].double() + (ui.double() @ v[lo:hi].double().t()) * s
        assert_close_to_fp64("up_add", ours[:, lo:hi], (y[:, lo:hi].float() + term).to(y.dtype), ref)


def test_configs_that_break_the_accuracy_contract_are_refused():
    x, p, u = torch.randn(8, 256, dtype=torch.bfloat16), torch.randn(16, 256), torch.randn(8, 16)
    with pytest.raises(ValueError):
        lowrank.down(x, p, config=dict(block_k=128))  # one dot over 128 terms
    with pytest.raises(ValueError):
        lowrank.grad(x, u, config=dict(block_m=128))
    with pytest.raises(ValueError):
        lowrank.grad(x, u, config=dict(block_rows=64))  # unknown key
    with pytest.raises(ValueError):
        lowrank.down(x, p, config=dict(parts="tf32"))


@pytest.mark.parametrize(
    "m, n, r, bounds, config",
    [
        (37, 80, 8, (), None),
        (111, 256, 16, (64, 192), None),
        (70, 160, 16, (32,), dict(block_m=16, block_k=32, sub=2)),
        (200, 448, 16, (), dict(sub=1, num_warps=4)),
        (5, 96, 32, (32, 64), dict(block_m=32, block_k=16, sub=4)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grad_and_down_is_grad_and_down(m, n, r, bounds, config, dtype):
    """dB^T = s u^T D and g = s D B from one pass over D: each within the fp32 matmul's error of
    float64, and the same as the two calls (to fp32 rounding of a differently ordered sum)."""
    cuts = [0, *bounds, n]
    count = len(cuts) - 1
    scales = (0.5, 2.0, 1.5)[:count] if bounds else 0.5
    each = scales if bounds else (scales,)
    d = torch.randn(m, n, dtype=dtype)
    u = torch.randn(m, count * r)
    b = torch.randn(n, r) * 0.05  # the B_i stacked along N
    db, g = lowrank.grad_and_down(d, u, b.t(), scales, bounds, rank=r, config=config)
    assert db.shape == (r, n) and g.shape == (m, count * r)
    for ours, theirs in ((db, lowrank.grad(d, u, scales, bounds, rank=r)), (g, lowrank.down(d, b.t(), scales, bounds))):
        ulps = (
            16 * torch.finfo(torch.float32).eps * theirs.abs().max().item()
        )  # their blocks are summed in another order
        torch.testing.assert_close(ours, theirs, rtol=0, atol=ulps)
    for i, (lo, hi, s) in enumerate(zip(cuts, cuts[1:], each)):
        di, bi, ui = d[:, lo:hi], b[lo:hi], u[:, i * r : (i + 1) * r]
        assert_close_to_fp64(
            f"grad seg {i}", db[:, lo:hi], (ui.t() @ di.float()) * s, (ui.double().t() @ di.double()) * s
        )
        assert_close_to_fp64(
            f"down seg {i}", g[:, i * r : (i + 1) * r], (di.float() @ bi) * s, (di.double() @ bi.double()) * s
        )


@pytest.mark.parametrize("config", [None, dict(block_m=16), dict(parts="chained")])
@pytest.mark.parametrize("bounds", [(), (64, 96)])
def test_grad_transposed_is_the_same_values_in_b_s_layout(bounds, config):
    """transposed=True: the same (R, K) values, stored so that each segment's .t() is contiguous
    (dB in B's layout: autograd adopts it as B.grad without a copy); the PyTorch path too."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(37, 128, generator=gen).bfloat16()
    u = torch.randn(37, 24 if bounds else 8, generator=gen)
    args = ((0.5, 2.0, 1.5), bounds, 8) if bounds else (0.5,)
    plain = lowrank.grad(x, u, *args, config=config)
    flipped = lowrank.grad(x, u, *args, transposed=True, config=config)
    assert torch.equal(plain, flipped) and flipped.t().is_contiguous()
    cuts = [0, *bounds, 128]
    assert all(flipped[:, a:b].t().is_contiguous() for a, b in zip(cuts, cuts[1:]))


def test_down_over_a_long_reduction_runs_its_parts_chained():
    """x A^T of down_proj (K = 14336): chained parts, as the H200 sweep measured faster; shorter or
    segmented reductions keep the stacked tile at rank <= 32; an explicit config still wins."""
    assert lowrank.plan("down", 4096, 14336, 16, device="cpu")["parts"] == lowrank._CHAINED.value
    assert lowrank.plan("down", 4096, 4096, 16, device="cpu")["parts"] == lowrank._STACKED.value
    assert lowrank.plan("down", 4096, 28672, 16, (14336,), device="cpu")["parts"] == lowrank._STACKED.value
    assert (
        lowrank.plan("down", 4096, 14336, 16, device="cpu", config=dict(parts="stacked"))["parts"]
        == lowrank._STACKED.value
    )
    gen = torch.Generator().manual_seed(2)
    x, p = torch.randn(37, 8192 + 64, generator=gen).bfloat16(), torch.randn(8, 8192 + 64, generator=gen) * 0.05
    ref = x.double() @ p.double().t() * 0.5
    eager = (x.float() @ p.t()) * 0.5
    assert_close_to_fp64("down, long K", lowrank.down(x, p, 0.5), eager, ref)
