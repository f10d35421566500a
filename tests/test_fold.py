"""The LoRA fold (kernels/fold.py): its extra columns, and the folded product against float64."""

import pytest
import torch
from numerics import assert_close_to_fp64

import kernels.fold as fold


def test_which_inputs_are_folded():
    bf16, fp16 = torch.bfloat16, torch.float16
    assert fold.columns(4096, [16, 16, 16], bf16, bf16) == 96
    assert fold.columns(4096, [3], bf16, bf16) == 8  # 2 r = 6, padded to a multiple of 8
    assert fold.columns(4096, [16], fp16, fp16) == 0  # U's residual would go subnormal in fp16
    assert fold.columns(4096, [16], bf16, torch.float32) == 0
    assert fold.columns(100, [16], bf16, bf16) == 0  # K not a multiple of 8
    assert fold.columns(4096, [8] * 4, bf16, bf16) == 0  # at most three projections
    assert fold.columns(4096, [257], bf16, bf16) == 0  # wider than MAX_COLUMNS


def folded(x, u, Bs, W, ranks, scales):
    """y through the fold: x_ext and w_ext filled as the nodes do, one GEMM."""
    m, k = x.shape
    e = fold.columns(k, ranks, x.dtype, x.dtype)
    x_ext = torch.full((m, k + e), float("nan"), dtype=x.dtype)
    x_ext[:, :k] = x
    fold.fill_input(x_ext, u, ranks, scales, k)
    w_ext = torch.full((W.shape[0], k + e), float("nan"), dtype=x.dtype)
    w_ext[:, :k] = W
    fold.fill_weight(w_ext, Bs, k)
    return x_ext @ w_ext.t()


@pytest.mark.parametrize("ranks, outs", [([8, 8, 8], [48, 16, 16]), ([5], [40]), ([4, 4], [24, 24])])
def test_folded_product_is_no_less_accurate_than_peft(ranks, outs):
    """y = x W^T + sum_i s_i u_i B_i^T against float64, within eager's error (PEFT's Linear4bit:
    the term rounded to bf16, then added to the rounded x W^T), odd M and padded columns."""
    gen = torch.Generator().manual_seed(3)
    m, k = 37, 72
    x = torch.randn(m, k, generator=gen).bfloat16()
    W = (torch.randn(sum(outs), k, generator=gen) / k**0.5).bfloat16()
    u = torch.randn(m, sum(ranks), generator=gen)
    Bs = [torch.randn(n, r, generator=gen) * 0.3 for n, r in zip(outs, ranks)]
    scales = [2.0, 0.5, 1.0][: len(ranks)]
    cuts = [0, *torch.tensor(ranks).cumsum(0).tolist()]
    terms = [s * u[:, a:b] @ B.t() for a, b, s, B in zip(cuts, cuts[1:], scales, Bs)]
    ref = x.double() @ W.double().t() + torch.cat([t.double() for t in terms], dim=1)
    eager = (x @ W.t()) + torch.cat(terms, dim=1).bfloat16()
    assert_close_to_fp64(f"fold {ranks}", folded(x, u, Bs, W, ranks, scales), eager, ref)


def test_fill_input_kernel_matches_the_pytorch_path(monkeypatch):
    """The Triton fill (interpreter here) and the PyTorch path write the same bits, zero padding."""
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(70, 12, generator=gen)
    x_ext = torch.full((70, 16 + 32), float("nan"), dtype=torch.bfloat16)
    fold.fill_input(x_ext, u, [4, 4, 4], [2.0, 0.5, 1.0], 16)
    ours = x_ext[:, 16:].clone()
    monkeypatch.setattr(fold, "use_triton", lambda *tensors: False)
    fold.fill_input(x_ext, u, [4, 4, 4], [2.0, 0.5, 1.0], 16)
    assert torch.equal(ours.view(torch.int16), x_ext[:, 16:].view(torch.int16))
    assert torch.equal(ours[:, 24:], torch.zeros(70, 8, dtype=torch.bfloat16))
    v = torch.cat([u[:, :4] * 2.0, u[:, 4:8] * 0.5, u[:, 8:]], dim=1)
    assert (ours[:, :12].float() + ours[:, 12:24].float() - v).abs().max() <= 2**-16 * v.abs().max()


def test_fill_weight_kernel_matches_the_pytorch_path(monkeypatch):
    """The Triton fill of [Bd | Bd | 0] (interpreter here) and torch.block_diag's: same bits,
    rows of a block straddling a projection's end (40 + 24 + 24 rows in blocks of 64)."""
    gen = torch.Generator().manual_seed(5)
    Bs = [torch.randn(n, r, generator=gen) for n, r in ((40, 4), (24, 4), (24, 4))]
    w_ext = torch.full((88, 16 + 32), float("nan"), dtype=torch.bfloat16)
    fold.fill_weight(w_ext, Bs, 16)
    ours = w_ext[:, 16:].clone()
    monkeypatch.setattr(fold, "use_triton", lambda *tensors: False)
    fold.fill_weight(w_ext, Bs, 16)
    assert torch.equal(ours.view(torch.int16), w_ext[:, 16:].view(torch.int16))
    assert torch.equal(ours[:, :12], torch.block_diag(*Bs).bfloat16()) and not ours[:, 24:].any()


@pytest.mark.parametrize("widths", [(256, 128, 128), (128,), (256, 384), (100, 28)])
def test_stack_into_the_first_columns_of_a_wider_buffer(widths):
    """q|k|v's gradients (or down's one) side by side in D_ext's first columns: what torch.cat
    writes, the extra columns untouched (widths not multiples of 128 take torch.cat itself)."""
    sources = [torch.randn(37, w).bfloat16() for w in widths]
    wide = torch.full((37, sum(widths) + 32), float("nan"), dtype=torch.bfloat16)
    fold.stack_into(wide[:, : sum(widths)], sources)
    assert torch.equal(wide[:, : sum(widths)], torch.cat(sources, dim=1)) and wide[:, sum(widths) :].isnan().all()
