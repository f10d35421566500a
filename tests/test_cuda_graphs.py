"""CUDA-graph replay of training steps (rewriter/cuda_graphs.py).

On a CPU machine: the report says why graphs are off, and the checkpoint pass saves the RNG
state only for regions that draw random numbers (reading it is not allowed during a capture).
On a GPU (skipped elsewhere): a model whose steps replay CUDA graphs trains like its twin that
runs eagerly, never writes the caller's tensors or the outputs a caller holds, runs two forwards
before their backwards correctly, and refuses a backward through an overwritten step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rewriter import optimize, report
from rewriter.checkpoint import draws_random_numbers
from tests.models import batch, tiny_causal_lm, train_losses

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


def _nodes(fn):
    return list(torch.fx.symbolic_trace(fn).graph.nodes)


def test_random_numbers_are_detected_conservatively():
    assert not draws_random_numbers(_nodes(lambda x: F.dropout(x, 0.0) + torch.sin(x)))
    assert draws_random_numbers(_nodes(lambda x: F.dropout(x, 0.1)))
    assert draws_random_numbers(_nodes(lambda x: x + torch.rand_like(x)))
    assert not draws_random_numbers(_nodes(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.0)))
    assert draws_random_numbers(_nodes(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)))
    assert not draws_random_numbers(_nodes(lambda x: F.normalize(x, dim=-1)))


def test_lora_dropout_in_a_fused_node_counts_as_random():
    from patterns.lora import projection

    def fused_node_over(proj):  # as patterns/lora.py binds a node: a closure over its projections
        def lora_node(x):
            return x * proj.scaling

        graph = torch.fx.Graph()
        graph.output(graph.call_function(lora_node, (graph.placeholder("x"),)))
        return list(graph.nodes)

    for rate, random in ((0.1, True), (0.0, False)):
        model = tiny_causal_lm("llama", lora_dropout=rate)
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        assert draws_random_numbers(fused_node_over(projection(q_proj, torch.float32))) is random


@pytest.mark.skipif(CUDA, reason="checks the CPU report line")
def test_gradients_leave_the_graph_as_views_of_one_fresh_buffer_that_autograd_adopts():
    """The replayed backward's gradient buffers are copied out with one multi-tensor copy per
    dtype; autograd keeps each view as the parameter's .grad and accumulates into it later."""
    from rewriter.cuda_graphs import _fresh_copies

    static = [torch.randn(3, 4), None, torch.randn(5), torch.randn(2, 2).t(), torch.randn(4).half()]
    copies = _fresh_copies(static)
    assert copies[1] is None
    for s, c in zip(static, copies):
        if s is not None:
            assert torch.equal(s, c) and c.data_ptr() != s.data_ptr() and c.shape == s.shape
    assert copies[0].untyped_storage().data_ptr() == copies[2].untyped_storage().data_ptr()  # one buffer

    class Twice(torch.autograd.Function):  # returns fresh views as its input's gradient, as _Replay does
        @staticmethod
        def forward(ctx, w):
            return w * 2

        @staticmethod
        def backward(ctx, g):
            return _fresh_copies([g * 2])[0]

    w = torch.nn.Parameter(torch.randn(3, 4))
    for _ in range(2):  # the second backward accumulates into the adopted view
        Twice.apply(w).sum().backward()
    assert torch.equal(w.grad, torch.full((3, 4), 4.0))


def test_report_says_why_graphs_are_off_on_cpu():
    model = tiny_causal_lm("llama")
    optimize(model)
    train_losses(model, steps=2)
    assert report(model).cuda_graphs == "off: the graph's inputs are not all on a CUDA device"
    off = tiny_causal_lm("llama")
    optimize(off, cuda_graphs=False)
    assert report(off).cuda_graphs == "off"


def test_graphs_stay_off_where_the_graph_draws_random_numbers():
    # the LoRA node keeps the generator state on the host for its backward: never captured
    model = tiny_causal_lm("llama", lora_dropout=0.1)
    optimize(model)
    train_losses(model, steps=2)
    assert report(model).cuda_graphs == "off: the graph draws random numbers (dropout)"


def _cuda_twins(**lora):
    a = tiny_causal_lm("llama", dtype=torch.bfloat16, **lora).cuda()
    b = tiny_causal_lm("llama", dtype=torch.bfloat16, **lora).cuda()
    sample = {k: v.cuda() for k, v in batch(0, length=32).items()}
    optimize(a, sample=sample)
    optimize(b, sample=sample, cuda_graphs=False)
    return a, b


def _fixed_batches(step: int) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in batch(100 + step, length=32).items()}


@needs_cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_replayed_steps_train_like_the_eager_twin(checkpointing):
    graphed, eager = _cuda_twins()
    for m in (graphed, eager):
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    losses = train_losses(graphed, steps=6, batches=_fixed_batches)
    expected = train_losses(eager, steps=6, batches=_fixed_batches)
    assert report(graphed).cuda_graphs.startswith("on:"), str(report(graphed))
    assert report(eager).cuda_graphs == "off"
    # same kernels, replayed: agreement far inside the bf16 whole-model bound (1e-2)
    for a, b in zip(losses, expected):
        assert abs(a - b) <= 1e-3 * abs(b)
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        if p.requires_grad:
            assert (p.float() - q.float()).norm() <= 1e-2 * q.float().norm() + 1e-6, name


@needs_cuda
def test_callers_tensors_and_held_outputs_are_never_written():
    model, _ = _cuda_twins()
    model.train()
    batches = [_fixed_batches(s) for s in range(5)]
    copies = [{k: v.clone() for k, v in b.items()} for b in batches]
    held, values = [], []
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        held.append(loss)
        values.append(loss.item())
    assert report(model).cuda_graphs.startswith("on:")
    assert [h.item() for h in held] == values  # later replays did not change earlier outputs
    for b, c in zip(batches, copies):
        assert all(torch.equal(b[k], c[k]) for k in b)


@needs_cuda
def test_two_forwards_before_their_backwards():
    graphed, eager = _cuda_twins()
    grads = []
    for m in (graphed, eager):
        m.train()
        for s in range(3):  # warm: the graphed model captures on its second call
            m(**_fixed_batches(s)).loss.backward()
        m.zero_grad(set_to_none=True)
        first, second = m(**_fixed_batches(10)).loss, m(**_fixed_batches(11)).loss
        second.backward()
        first.backward()
        grads.append([p.grad.float().clone() for p in m.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert (a - b).norm() <= 1e-2 * b.norm() + 1e-6


@needs_cuda
def test_backward_through_an_overwritten_step_raises():
    model, _ = _cuda_twins()
    model.train()
    for s in range(3):
        model(**_fixed_batches(s)).loss.backward()
    old = model(**_fixed_batches(3)).loss
    old.backward()
    model(**_fixed_batches(4)).loss.backward()  # replays over old's activations
    with pytest.raises(RuntimeError, match="overwritten"):
        old.backward()


@needs_cuda
def test_early_launch_is_adopted_when_the_call_matches_and_discarded_when_not(monkeypatch):
    """Each replayed step launches its forward as the call enters (one forward and one backward
    replay a step, not two forwards); a moved parameter or a new batch shape discards the early
    launch and the step still equals the eager twin's."""
    graphed, eager = _cuda_twins()
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(self), replay(self))[1])

    def step(m, b):
        loss = m(**b).loss
        loss.backward()
        return loss.item()

    for m in (graphed, eager):
        m.train()
        for s in range(3):  # the graphed model captures on its second call
            step(m, _fixed_batches(s))
    replays.clear()
    assert step(graphed, _fixed_batches(3)) == pytest.approx(step(eager, _fixed_batches(3)), rel=1e-3)
    assert len(replays) == 2 and replays[0] is not replays[1]  # adopted: forward, then backward
    for m in (graphed, eager):  # a parameter moves to new storage: replay must not read the old one
        lora_b = next(p for n, p in m.named_parameters() if "lora_B" in n)
        lora_b.data = lora_b.data.clone() + 0.01
    assert step(graphed, _fixed_batches(4)) == pytest.approx(step(eager, _fixed_batches(4)), rel=1e-3)
    longer = {k: torch.cat([v, v], dim=1) for k, v in _fixed_batches(5).items()}
    assert step(graphed, longer) == pytest.approx(step(eager, longer), rel=1e-3)
    assert report(graphed).cuda_graphs.startswith("on:"), str(report(graphed))


@needs_cuda
def test_a_graph_that_writes_an_input_in_place_is_never_captured_and_writes_once_a_call():
    """A buffer updated by every forward (a running statistic): replaying it would apply the
    write again in the capture's check run and in each replay; it runs eagerly, the status says why."""
    from rewriter.cuda_graphs import Replayer

    lines = []
    replayer = Replayer(lambda line, failure: lines.append(line), {torch.float32: 1e-5})
    count = torch.zeros((), device="cuda")
    w = torch.randn(4, 4, device="cuda", requires_grad=True)

    def fn(x, w, count):
        count.add_(1)
        return (x @ w).sum()

    for _ in range(4):
        replayer(fn, [torch.randn(3, 4, device="cuda"), w, count]).backward()
    assert count.item() == 4
    assert replayer.capture is None and "writes one of its inputs in place" in lines[-1], lines
