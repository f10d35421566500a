"""SwiGLU kernel: h = silu(e) * g, de and dg against float64, on fresh random inputs."""

import pytest
import torch
from numerics import assert_close_to_fp64

from kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference, swiglu_unsupported

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def swiglu_fp64(e, g):
    """The math written directly in float64."""
    return e * torch.sigmoid(e) * g


def run(fn, e, g, dh, wrt=(0, 1)):
    leaves = [e.detach().requires_grad_(0 in wrt), g.detach().requires_grad_(1 in wrt)]
    h = fn(*leaves)
    grads = torch.autograd.grad(h, [leaves[i] for i in wrt], dh.to(h.dtype))
    return [h.detach(), *grads]


def check_all(dtype, e, g, wrt=(0, 1), label=""):
    dh = torch.randn(e.shape, dtype=torch.float64).to(dtype)
    ours = run(SwiGLUFunction.apply, e, g, dh, wrt)
    eager = run(swiglu_reference, e, g, dh, wrt)
    ref = run(swiglu_fp64, e.double(), g.double(), dh.double(), wrt)
    names = ["h"] + [("de", "dg")[i] for i in wrt]
    for name, o, e_, r in zip(names, ours, eager, ref):
        assert o.dtype == e_.dtype and o.shape == e_.shape, name
        assert_close_to_fp64(f"{name} {dtype} {label}", o, e_, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 1000), (2, 5, 14336), (1001,)])
def test_matches_float64_within_eager_error(dtype, shape):
    """Gate values spread over [-12, 12] so that both tails of the sigmoid are exercised."""
    e = (torch.randn(shape, dtype=torch.float64) * 4).to(dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    check_all(dtype, e, g, label=str(shape))


@pytest.mark.parametrize("wrt", [(0,), (1,)], ids=["gate only", "up only"])
def test_one_input_requires_grad(wrt):
    e = torch.randn(5, 300, dtype=torch.bfloat16)
    g = torch.randn(5, 300, dtype=torch.bfloat16)
    check_all(torch.bfloat16, e, g, wrt=wrt)


def test_forward_keeps_hf_cast_points():
    """HF rounds silu(e) to bf16 before the product: so do we (the sigmoid itself may differ
    from PyTorch's in the last fp32 bit, which almost never survives rounding to bf16)."""
    e = torch.randn(64, 512, dtype=torch.bfloat16) * 3
    g = torch.randn(64, 512, dtype=torch.bfloat16)
    ours, eager = SwiGLUFunction.apply(e, g), swiglu_reference(e, g)
    assert (ours != eager).float().mean().item() < 1e-3


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # exp(1e4) = inf, as intended
def test_extreme_gates_stay_finite():
    e = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4])
    g = torch.ones(7)
    e.requires_grad_()
    h = SwiGLUFunction.apply(e, g)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(e.grad).all()
    torch.testing.assert_close(h.detach(), swiglu_reference(e.detach(), g))


def test_saves_only_gate_and_up():
    e = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SwiGLUFunction.apply(e, g)
    assert [t.data_ptr() for t in saved] == [e.data_ptr(), g.data_ptr()]


def test_non_contiguous_inputs():
    e = torch.randn(300, 6, dtype=torch.float64).to(torch.bfloat16).t()
    g = torch.randn(6, 300, dtype=torch.float64).to(torch.bfloat16)
    check_all(torch.bfloat16, e, g, label="transposed gate")


def test_unsupported_inputs_fall_back_with_a_reason():
    e, g = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert "unsupported dtypes" in swiglu_unsupported(e, g)
    assert torch.equal(swiglu(e, g), swiglu_reference(e, g))
    e, g = torch.randn(3, 8), torch.randn(1, 8)
    assert "differ" in swiglu_unsupported(e, g)
    assert torch.equal(swiglu(e, g), swiglu_reference(e, g))
    assert "unsupported dtypes" in swiglu_unsupported(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.bfloat16))


def test_empty():
    e = torch.randn(0, 64, requires_grad=True)
    g = torch.randn(0, 64, requires_grad=True)
    h = swiglu(e, g)
    h.sum().backward()
    assert h.shape == (0, 64) and e.grad.shape == (0, 64)


@pytest.mark.parametrize("into_dh", [False, True])
def test_backward_also_writes_h_with_the_forwards_bits(into_dh):
    """silu_mul_backward(..., h): h = silu(e) * g exactly as the forward writes it, also over dh
    itself (the fused MLP's dA of down), and de, dg as without it."""
    from kernels.swiglu import silu_mul, silu_mul_backward

    e, g, dh = (torch.randn(37, 100, dtype=torch.bfloat16) for _ in range(3))
    de0, dg0 = torch.empty_like(e), torch.empty_like(g)
    silu_mul_backward(dh, e, g, de0, dg0)
    de, dg = torch.empty_like(e), torch.empty_like(g)
    dh_copy = dh.clone()
    h = dh_copy if into_dh else torch.empty_like(e)
    silu_mul_backward(dh_copy, e, g, de, dg, h)
    assert torch.equal(h, silu_mul(e, g)) and torch.equal(de, de0) and torch.equal(dg, dg0)
