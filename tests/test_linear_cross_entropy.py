"""Fused lm_head + cross-entropy: loss, dx and dW against float64, on fresh random inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_close_to_fp64

from kernels.linear_cross_entropy import (
    LinearCrossEntropyFunction,
    Options,
    chunk_rows,
    chunks,
    default_chunk_bytes,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def loss_fp64(
    x, w, labels, *, ignore_index=-100, reduction="mean", num_items_in_batch=None, logit_scale=None, softcap=None
):
    """The math written directly in float64 (no `.float()` anywhere)."""
    z = x.reshape(-1, w.shape[1]) @ w.t()
    if logit_scale is not None:
        z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
    nll = -logp.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0] * valid
    if num_items_in_batch is not None:
        return nll.sum() / float(num_items_in_batch)
    return nll.sum() if reduction == "sum" else nll.sum() / valid.sum().clamp_min(1)


def run(fn, x, w, labels, cotangent=1.0, **kwargs):
    """Loss, dx and dW of fn at (x, w), the loss's gradient being `cotangent`."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(x, w, labels, **kwargs)
    dx, dw = torch.autograd.grad(loss, (x, w), torch.tensor(cotangent, dtype=loss.dtype))
    return loss.detach(), dx, dw


def random_problem(tokens, hidden, vocab, dtype, ignored=0.2):
    x = torch.randn(tokens, hidden, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) * 2 / hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, (tokens,))
    labels[torch.rand(tokens) < ignored] = -100
    return x, w, labels


def redrawn(labels, vocab, draws):
    """`labels` and draws-1 other labelings of the same tokens (same ignored positions)."""
    others = [torch.where(labels == -100, labels, torch.randint_like(labels, vocab)) for _ in range(draws - 1)]
    return [labels] + others


def assert_all_close_to_fp64(case, x, w, labels, cotangent=1.0, fused=linear_cross_entropy, draws=8, **kwargs):
    """dx and dW against float64 for `labels`; the loss over `draws` labelings. One fp32 loss is
    one rounding, and whether eager's happens to land nearer float64 than ours is luck (ours is
    summed in fp64 and rounded once, but the model-dtype logits it starts from are shared);
    over several draws the comparison is a norm over many roundings, as it is for dx and dW."""
    chunk_bytes = kwargs.pop("chunk_bytes", None)
    ours = run(fused, x, w, labels, cotangent, chunk_bytes=chunk_bytes, **kwargs)
    eager = run(linear_cross_entropy_reference, x, w, labels, cotangent, **kwargs)
    ref = run(loss_fp64, x.double(), w.double(), labels, cotangent, **kwargs)
    for name, o, e, r in zip(("dx", "dW"), ours[1:], eager[1:], ref[1:]):
        assert o.dtype == e.dtype == x.dtype, name
        assert_close_to_fp64(f"{name} {case}", o, e, r)
    with torch.no_grad():
        draws = redrawn(labels, w.shape[0], draws)
        losses = [fused(x, w, y, chunk_bytes=chunk_bytes, **kwargs) for y in draws]
        eager_losses = [linear_cross_entropy_reference(x, w, y, **kwargs) for y in draws]
        ref_losses = [loss_fp64(x.double(), w.double(), y, **kwargs) for y in draws]
    assert all(o.dtype == e.dtype == torch.float32 and o.shape == () for o, e in zip(losses, eager_losses))
    assert torch.equal(losses[0], ours[0])  # the loss of the gradient run is the first draw's
    assert_close_to_fp64(f"loss {case}", torch.stack(losses), torch.stack(eager_losses), torch.stack(ref_losses))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [1000, 32000])
@pytest.mark.parametrize("num_items", [None, 41, "tensor"])
def test_loss_and_gradients_match_float64(dtype, vocab, num_items):
    tokens = 37  # chunks of 16 and 21 rows (a tail shorter than 16 joins the chunk before)
    x, w, labels = random_problem(tokens, 67, vocab, dtype)
    if num_items == "tensor":
        num_items = (labels != -100).sum() + 3  # gradient accumulation: counted over several batches
    case = f"{dtype} V={vocab} num_items={num_items}"
    assert_all_close_to_fp64(case, x, w, labels, num_items_in_batch=num_items, chunk_bytes=16 * vocab * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_default_chunk_sum_reduction_and_scaled_backward(dtype):
    """The default budget (one chunk here), reduction="sum" as HF uses it before dividing by
    num_items_in_batch, and an incoming gradient that is not 1 (backward scales in fp32)."""
    x, w, labels = random_problem(131, 64, 1000, dtype)
    assert chunk_rows(131, 64, 1000, x.device) == 131
    assert_all_close_to_fp64(f"{dtype}", x, w, labels, cotangent=0.3671875, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softcap_and_logit_scale_match_float64(dtype):
    x, w, labels = random_problem(45, 48, 1000, dtype)
    for options in (dict(softcap=2.5), dict(logit_scale=0.625), dict(softcap=4.0, logit_scale=1.75)):
        assert_all_close_to_fp64(f"{dtype} {options}", x, w, labels, chunk_bytes=16 * 1000 * 4, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pytorch_row_step_matches_float64(dtype):
    """The CPU path without Triton: the same chunks, the per-row step in PyTorch."""

    def fused_torch(x, w, labels, chunk_bytes=None, **kwargs):
        return LinearCrossEntropyFunction.apply(x, w, labels, None, Options(chunk_bytes=chunk_bytes, **kwargs), False)

    x, w, labels = random_problem(37, 67, 32000, dtype)
    assert_all_close_to_fp64(f"{dtype}", x, w, labels, fused=fused_torch, chunk_bytes=16 * 32000 * 4)
    assert_all_close_to_fp64(f"{dtype} softcap", x, w, labels, fused=fused_torch, softcap=3.0, logit_scale=0.5)


@pytest.mark.parametrize("num_items", [None, 12])
def test_all_ignored_batch_gives_zero_loss_and_zero_gradients(num_items):
    x, w, labels = random_problem(41, 32, 1000, torch.bfloat16, ignored=1.0)
    loss, dx, dw = run(linear_cross_entropy, x, w, labels, num_items_in_batch=num_items, chunk_bytes=16 * 1000 * 4)
    assert loss.item() == 0.0
    assert not dx.any() and not dw.any()
    hf = linear_cross_entropy_reference(x, w, labels, num_items_in_batch=num_items)
    assert hf.isnan().item() if num_items is None else hf.item() == 0.0  # HF's mean is 0/0 there


def test_frozen_weight_gets_no_gradient_and_the_same_dx():
    x, w, labels = random_problem(37, 67, 1000, torch.bfloat16)
    _, dx_trainable, _ = run(linear_cross_entropy, x, w, labels)
    x = x.detach().requires_grad_()
    loss = linear_cross_entropy(x, w, labels)
    (dx,) = torch.autograd.grad(loss, x)
    assert torch.equal(dx, dx_trainable)
    assert not linear_cross_entropy(x.detach(), w, labels).requires_grad


def test_batched_shapes_and_an_empty_batch():
    x = torch.randn(3, 7, 40, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(500, 40, dtype=torch.bfloat16)
    labels = torch.randint(0, 500, (3, 7))
    linear_cross_entropy(x, w, labels).backward()
    assert x.grad.shape == (3, 7, 40) and x.grad.dtype == torch.bfloat16
    empty = torch.randn(0, 40, requires_grad=True)
    loss = linear_cross_entropy(empty, w.float(), torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 40)


def test_a_label_outside_the_vocabulary_gives_nan_not_a_crash():
    x, w, labels = random_problem(5, 16, 100, torch.float32, ignored=0.0)
    labels[2] = 100
    assert linear_cross_entropy(x, w, labels).isnan().item()


def test_bad_reduction_is_refused():
    x, w, labels = random_problem(5, 16, 100, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, labels, reduction="none")


def test_chunk_size_follows_the_memory_budget():
    cpu = torch.device("cpu")
    vocab = 32000
    assert chunk_rows(8192, 512, vocab, cpu, chunk_bytes=300 * vocab * 4) == 256  # whole GEMM tiles
    assert chunk_rows(8192, 512, vocab, cpu, chunk_bytes=100 * vocab * 4 + 5) == 100
    assert chunk_rows(8192, 512, vocab, cpu, chunk_bytes=1) == 16  # one MMA tile at least
    assert chunk_rows(50, 512, vocab, cpu, chunk_bytes=1 << 40) == 50
    assert chunk_rows(5, 512, vocab, cpu, chunk_bytes=1) == 5
    assert chunks(37, 16) == [(0, 16), (16, 37)] and chunks(48, 16) == [(0, 16), (16, 32), (32, 48)]
    assert chunks(10, 16) == [(0, 10)] and chunks(0, 16) == []
    # the default budget: the fp32 size of the hidden states, so chunks grow with the batch
    small, large = default_chunk_bytes(8192, 512, cpu), default_chunk_bytes(32768, 512, cpu)
    assert small == 8192 * 512 * 4 and large == 32768 * 512 * 4
    assert chunk_rows(8192, 512, vocab, cpu) == 128 and chunk_rows(32768, 512, vocab, cpu) == 512
    assert default_chunk_bytes(100, 512, cpu) == 16 << 20  # never below the CPU floor


def probe(variant: str) -> dict:
    script = Path(__file__).with_name("loss_memory_probe.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), variant], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_peak_memory_is_a_fraction_of_eager():
    """Vocab 32000, 8192 tokens, hidden 512, bf16, frozen lm_head (LoRA), CPU: extra resident
    memory over the inputs during forward + backward. Eager holds the bf16 logits, their fp32
    copy, the fp32 log-softmax and the fp32 gradient (> 2 GB); we hold one chunk and the fp32 dx."""
    fused, eager = probe("fused"), probe("eager")
    assert fused["loss"] == pytest.approx(eager["loss"], rel=1e-3)
    extra_fused, extra_eager = fused["peak"] - fused["before"], eager["peak"] - eager["before"]
    assert extra_eager > 8192 * 32000 * 8  # eager really materialised the logits
    assert extra_fused <= 0.25 * extra_eager, (
        f"fused {extra_fused / 2**20:.0f} MiB vs eager {extra_eager / 2**20:.0f} MiB"
    )
