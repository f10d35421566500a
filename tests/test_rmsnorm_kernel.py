"""RMSNorm kernel: forward, dx and dw against float64, on fresh random inputs."""

import pytest
import torch
from numerics import assert_close_to_fp64

from kernels.rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rmsnorm_fp64(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def grads(fn, x, w, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    dx, dw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    return y.detach(), dx, dw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 1000), (4, 4096), (3, 5, 96)])
def test_matches_float64_within_eager_error(dtype, shape):
    eps = 1e-5
    x = torch.randn(shape, dtype=dtype) * 3
    w = (1 + 0.3 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    ours = grads(lambda a, b: RMSNormFunction.apply(a, b, eps), x, w, dy)
    eager = grads(lambda a, b: rmsnorm_reference(a, b, eps), x, w, dy)
    ref = grads(lambda a, b: rmsnorm_fp64(a, b, eps), x.double(), w.double(), dy.double())
    for name, o, e, r in zip(("y", "dx", "dw"), ours, eager, ref):
        assert o.dtype == e.dtype
        assert_close_to_fp64(f"{name} {dtype} {shape}", o, e, r)


def test_frozen_weight_gets_no_gradient_and_dx_is_unchanged():
    x = torch.randn(37, 1000, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, dtype=torch.bfloat16)
    y = RMSNormFunction.apply(x, w, 1e-6)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x2 = x.detach().requires_grad_()
    w2 = w.clone().requires_grad_()
    dx2, _ = torch.autograd.grad(RMSNormFunction.apply(x2, w2, 1e-6), (x2, w2), torch.ones_like(y))
    assert torch.equal(dx, dx2)


def test_fp32_weight_on_bf16_input_follows_promotion():
    """prepare_model_for_kbit_training keeps norm weights in fp32 while activations are bf16."""
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.float32)
    dy = torch.randn(9, 64, dtype=torch.float64)
    ours = grads(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), x, w, dy)
    eager = grads(lambda a, b: rmsnorm_reference(a, b, 1e-6), x, w, dy)
    ref = grads(lambda a, b: rmsnorm_fp64(a, b, 1e-6), x.double(), w.double(), dy.double())
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for name, o, e, r in zip(("y", "dx", "dw"), ours, eager, ref):
        assert_close_to_fp64(name, o, e, r)


def test_empty_batch():
    x = torch.randn(0, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    y = rmsnorm(x, w, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 64) and torch.equal(w.grad, torch.zeros(64))


def test_rows_whose_elements_are_not_adjacent_in_memory():
    """A transposed view (last stride != 1), forward and both gradients, against float64."""
    eps = 1e-5
    x = torch.randn(96, 37, dtype=torch.bfloat16).t()  # (37, 96), strides (1, 37)
    w = (1 + 0.3 * torch.randn(96)).to(torch.bfloat16)
    dy = torch.randn(37, 96, dtype=torch.float64).to(torch.bfloat16)
    ours = grads(lambda a, b: RMSNormFunction.apply(a, b, eps), x, w, dy)
    eager = grads(lambda a, b: rmsnorm_reference(a, b, eps), x, w, dy)
    ref = grads(lambda a, b: rmsnorm_fp64(a, b, eps), x.double(), w.double(), dy.double())
    for name, o, e, r in zip(("y", "dx", "dw"), ours, eager, ref):
        assert_close_to_fp64(f"transposed {name}", o, e, r)


def test_forward_into_the_first_columns_of_a_wider_buffer():
    """The LoRA fold's nodes normalise straight into an (rows, N + e) buffer: same bits as the
    plain forward (the Triton kernel and the PyTorch path), extra columns untouched."""
    from kernels.rmsnorm import rmsnorm_forward

    x = torch.randn(37, 96, dtype=torch.bfloat16)
    w = (1 + 0.3 * torch.randn(96)).to(torch.bfloat16)
    y, r = rmsnorm_forward(x, w, 1e-5)
    wide = torch.full((37, 96 + 40), float("nan"), dtype=torch.bfloat16)
    y_wide, r_wide = rmsnorm_forward(x, w, 1e-5, out=wide[:, :96])
    assert y_wide.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[:, :96], y) and torch.equal(r_wide, r) and wide[:, 96:].isnan().all()
    with pytest.raises(ValueError, match="needs"):
        rmsnorm_forward(x, w, 1e-5, out=torch.empty(37, 96))
