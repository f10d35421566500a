"""optimize(model): capture, match, replace, verify, report; the model object is kept.

The Hugging Face causal LM inside the model (under a PEFT wrapper, if any) gets an instance
`forward` that, in training with gradients enabled, runs through the Dynamo-captured and
rewritten graph; everywhere else (eval, no_grad, generate) it runs the original forward, so
what the model returns to its callers never changes shape."""

from __future__ import annotations

import functools
import math
import types
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx import Node

import patterns as _builtin_pattern_files  # noqa: F401  (importing registers them)
from rewriter import capture, registry
from rewriter.capture import compile_with, graph_break_reasons, wrap_mask_builders
from rewriter.checkpoint import checkpoint_regions
from rewriter.cuda_graphs import Replayer
from rewriter.match import Match, Pattern, find_matches
from rewriter.module_match import ModulePattern
from rewriter.replace import rewrite
from rewriter.report import MatchRecord, RewriteReport, WholeModelCheck
from rewriter.verify import check_matches, relative_error

# Whole-model check, in the model's dtype (no float64 judge here, the per-match checks are
# the strict ones): the largest relative difference in the loss and in all trainable gradients
# (one vector) between the original and the rewritten model that still counts as rounding, not
# wiring; or SPREAD_FACTOR times the original's difference with itself, if that is larger.
# bf16 gradients: on the 8B model (32 layers, 4096 tokens, H200) every replacement matched
# float64 within eager's own error, yet the gradient vectors of the two models differed by
# 5.8e-2 and 5.9e-2 (bf16 is 3.9e-3 per rounding, and each model rounds in different places
# through 32 layers of backward), while the original differed from itself by 1-2e-2
# (nondeterministic attention backward). A wiring error moves gradients by O(1).
WHOLE_MODEL_BOUNDS = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 1e-1),
}
SPREAD_FACTOR = 4.0

_REPORTS: weakref.WeakKeyDictionary[torch.nn.Module, RewriteReport] = weakref.WeakKeyDictionary()


_UNSET = object()
_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, _Session] = weakref.WeakKeyDictionary()


def _bound_forward(hf: torch.nn.Module, original: Any) -> Any:
    """The instance forward optimize() installs: a method bound to `hf` that finds its session
    by the module it is called on. A copy of the model (copy.deepcopy rebinds bound methods
    to the copy) has no session and runs the class's forward unoptimized, never the
    original's graph with the original's parameters."""
    function = getattr(original, "__func__", None) or type(hf).forward

    @functools.wraps(function)  # keeps the signature HF Trainer inspects
    def forward(self, *args, **kwargs):
        session = _SESSIONS.get(self)
        if session is None:
            if not getattr(self, "_graft_copy_warned", False):
                self._graft_copy_warned = True
                warnings.warn("graft: this is a copy of an optimized model; it runs unoptimized", stacklevel=2)
            return type(self).forward(self, *args, **kwargs)
        return session.forward(*args, **kwargs)

    method = types.MethodType(forward, hf)
    forward.graft_original = original
    return method


class GraftError(RuntimeError):
    """Raised under strict=True when graft cannot rewrite or verify a model."""


def report(model: torch.nn.Module) -> RewriteReport:
    """The rewrite report of a model passed to optimize()."""
    if model not in _REPORTS:
        raise KeyError("this model was not passed to rewriter.optimize()")
    return _REPORTS[model]


def optimize(
    model: torch.nn.Module,
    *,
    sample: Mapping[str, Any] | None = None,
    verify: bool = True,
    strict: bool = False,
    patterns: Sequence[str | Pattern | ModulePattern] | None = None,
    cuda_graphs: bool = True,
) -> torch.nn.Module:
    """Rewrite `model` (a Hugging Face causal LM, plain or PEFT-wrapped) to train through
    graft's kernels, verify it on `sample` (a batch dict; one is made from the config if
    None) and return the same model object. With `cuda_graphs`, training steps on CUDA are
    replayed from captured CUDA graphs where rewriter/cuda_graphs.py allows it. See
    `report(model)` for what happened."""
    hf = _causal_lm(model)
    model_type = getattr(getattr(hf, "config", None), "model_type", None) or type(hf).__name__
    rep = RewriteReport(model_type=model_type, verify=verify)
    _REPORTS[model] = rep
    _REPORTS[hf] = rep
    chosen = _choose_patterns(model_type, patterns)
    if chosen is None:
        known = ", ".join(registry.architectures())
        rep.add_fallback(None, None, f"no pattern set applies to {model_type!r} (pattern sets: {known})")
    elif not hasattr(hf, "config") or not hasattr(hf, "get_input_embeddings"):
        rep.add_fallback(None, None, f"{type(hf).__name__} is not a Hugging Face causal LM")
        chosen = None
    if chosen is None:
        _finish(rep, strict)
        return model
    rep.patterns = [p.name for p in chosen]
    session = _Session(hf, chosen, rep, verify, strict, cuda_graphs)
    batch = dict(sample) if sample is not None else synthesize_sample(hf)
    rep.sample_tokens = int(batch["input_ids"].numel()) if "input_ids" in batch else 0
    session.first_call(model, batch)
    if torch.cuda.is_available() and _cuda_devices(hf):
        # the checks' float64 references leave the allocator holding their blocks (tens of GiB
        # on an 8B model at 4096 tokens); training should start from what the model needs
        torch.cuda.empty_cache()
    _finish(rep, strict)
    return model


def _finish(rep: RewriteReport, strict: bool) -> None:
    if strict and (
        rep.fallbacks or (rep.verify and not rep.verified) or any(m.status == "reverted" for m in rep.matches)
    ):
        raise GraftError(f"graft could not rewrite this model as asked (strict=True):\n{rep}")


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _choose_patterns(model_type: str, names: Sequence[Any] | None) -> list[Any] | None:
    if names is None:
        return registry.patterns_for(model_type)
    return [registry.pattern_named(p) if isinstance(p, str) else p for p in names]


def synthesize_sample(hf: torch.nn.Module, batch: int = 2, length: int = 16) -> dict[str, torch.Tensor]:
    """Random token ids (seed 0) with labels: enough to exercise every pattern."""
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    device = hf.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


class _ModuleIndex:
    """Maps a graph node to the module it came from, as a path of `named_modules()`."""

    def __init__(self, root: torch.nn.Module):
        self.by_id = {str(id(m)): (name, type(m).__name__) for name, m in root.named_modules()}

    def __call__(self, node: Node) -> tuple[str, str]:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", ""
        key, (path, cls) = list(stack.items())[-1]
        if key in self.by_id:
            return self.by_id[key]
        return path, getattr(cls, "__name__", str(cls))


class _RewrittenGraph:
    """What our Dynamo backend returns: the current rewrite of one captured graph. Reverting
    a replacement swaps `current`, without recompiling anything."""

    def __init__(self, session: _Session, gm: torch.fx.GraphModule, matches: list[Match]):
        self.session, self.original, self.matches = session, gm, matches
        self.replayer = session.replayer()
        self.rebuild()

    def rebuild(self) -> None:
        keep = [m for m in self.matches if self.session.decisions.get(m.key, False)]
        self.current = rewrite(self.original, keep)
        self.checkpointed: dict[tuple[str, ...], torch.fx.GraphModule] = {}
        if self.replayer is not None:
            self.replayer.release()

    def __call__(self, *args: Any) -> Any:
        self.session.ran = True
        fn = self._runnable(self.session.checkpoint_layers)
        if self.replayer is None or self.session.verifying:
            return fn(*args)
        return self.replayer(fn, args)

    def _runnable(self, layers: tuple[str, ...]) -> torch.fx.GraphModule:
        if not layers:
            return self.current
        if layers not in self.checkpointed:
            gm, skipped = checkpoint_regions(self.current, self.session.layer_of, layers)
            for why in skipped:
                self.session.report.add_fallback("checkpoint", None, why)
            self.checkpointed[layers] = gm
        return self.checkpointed[layers]


class _Session:
    def __init__(
        self,
        hf: torch.nn.Module,
        patterns: list[Pattern],
        rep: RewriteReport,
        verify: bool,
        strict: bool,
        cuda_graphs: bool,
    ):
        self.hf, self.patterns, self.report, self.verify, self.strict = hf, patterns, rep, verify, strict
        self.cuda_graphs = cuda_graphs
        self.verifying = False  # first_call: no CUDA graph is captured for the sample
        rep.cuda_graphs = "not yet: a training step's second call with one shape captures" if cuda_graphs else "off"
        self.decisions: dict[tuple[str, str, int], bool] = {}
        self.graphs: list[_RewrittenGraph] = []
        self.module_of = _ModuleIndex(hf)
        self.modules = dict(hf.named_modules())
        self.param_names = {id(p): name for name, p in hf.named_parameters()}
        self.class_flags: dict[type, Any] = {}  # each module class's gradient_checkpointing default
        self.leaf_paths: dict[tuple[int, ...], tuple[str, ...]] = {}
        self.replayers: list[Replayer] = []  # one per captured graph (rewriter/cuda_graphs.py)
        self.call_inputs: dict[str, Any] = {}  # the named inputs of the training call in progress
        self.ran = False
        self.bypass = False  # run the original forward (the whole-model check's reference)
        self.checkpoint_layers: tuple[str, ...] = ()
        # optimize() called again on the same model: start from the original forward
        original = getattr(hf.forward, "graft_original", hf.forward)
        if getattr(original, "__self__", hf) is not hf:  # a copy of an optimized model
            original = types.MethodType(original.__func__, hf)
        self.original_forward = original
        wrapped = wrap_mask_builders(hf)
        rep.masks = (
            "eager's (none when eager skips it: no padding, no packed positions), from "
            + ", ".join(sorted({w.rsplit(".", 1)[1] for w in wrapped}))
            if wrapped
            else "traced (no transformers mask builder found: SDPA gets the materialised mask)"
        )
        self.compiled = compile_with(self.original_forward, self.backend, type(hf).__name__)
        _SESSIONS[hf] = self
        hf.forward = _bound_forward(hf, self.original_forward)

    # -- running ---------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.bypass or not (self.hf.training and torch.is_grad_enabled()):
            return self.original_forward(*args, **kwargs)
        # positional input_ids only: anything more positional is not judged (the mask is built)
        named = dict(kwargs, input_ids=args[0]) if len(args) == 1 else kwargs
        latest = max(self.replayers, key=lambda r: r.replayed_at, default=None)
        if latest is not None and latest.replayed_at:  # the GPU starts on the batch while the host checks
            latest.speculate(named)
        self.ran = False
        graphs_before, breaks_before = len(self.graphs), graph_break_reasons()
        flagged = self._checkpointing_flagged()
        if flagged:
            # HF's checkpointing breaks the graph; capture the layers whole and checkpoint
            # them in the rewritten graph instead (rewriter/checkpoint.py). HF turns the cache
            # off under checkpointing; so do we.
            self.checkpoint_layers = self._leaf_paths(flagged)
            kwargs.setdefault("use_cache", False)
            self.report.checkpointing = f"graft's own, {len(self.checkpoint_layers)} layer(s)"
        hooks = self._input_grad_hooks()
        try:
            for m in flagged:
                m.gradient_checkpointing = False
            for key in hooks:
                del hooks[key][0][key]
            capture.SKIP_MASKS = len(args) <= 1 and capture.eager_skips_mask(self.hf.config, named)
            self.call_inputs = named
            out = self.compiled(*args, **kwargs)
        finally:
            self.call_inputs = {}
            capture.SKIP_MASKS = False
            for m in flagged:
                m.gradient_checkpointing = True
            for key, (table, hook) in hooks.items():
                table[key] = hook
            self.checkpoint_layers = ()
        if len(self.graphs) > graphs_before:
            for reason, n in graph_break_reasons().items():
                if n > breaks_before.get(reason, 0):
                    self.report.graph_breaks[reason] = (
                        self.report.graph_breaks.get(reason, 0) + n - breaks_before.get(reason, 0)
                    )
        if not self.ran:
            why = "Dynamo ran the original forward (recompile limit or capture error)"
            if all(f.reason != why for f in self.report.fallbacks):
                warnings.warn(f"graft: {why}; this step ran unoptimized", stacklevel=3)
            self.report.add_fallback(None, None, why)
            if self.strict:
                raise GraftError(str(self.report))
        return out

    def _checkpointing_flagged(self) -> list[torch.nn.Module]:
        """The modules with HF's gradient_checkpointing flag on, read from each module's own
        dict, then its class: getattr on an nn.Module without the attribute goes through
        Module.__getattr__ and its exception, ~2 ms a call over the 8B model's 1,300 modules."""
        flagged = []
        for m in self.modules.values():
            flag = m.__dict__.get("gradient_checkpointing", _UNSET)
            if flag is _UNSET:
                cls = type(m)
                if cls not in self.class_flags:
                    default = getattr(cls, "gradient_checkpointing", False)
                    self.class_flags[cls] = _UNSET if hasattr(default, "__get__") else default  # a descriptor
                flag = self.class_flags[cls]
                if flag is _UNSET:
                    flag = getattr(m, "gradient_checkpointing", False)
            if flag is True:
                flagged.append(m)
        return flagged

    def _input_grad_hooks(self) -> dict[int, tuple[dict, Any]]:
        """HF's enable_input_require_grads hook (it exists for reentrant checkpointing, which
        graft replaces): Dynamo cannot capture its requires_grad_() call and would split the
        graph there, so it is lifted for graft's calls."""
        table = getattr(self.hf.get_input_embeddings(), "_forward_hooks", {})
        return {k: (table, h) for k, h in table.items() if getattr(h, "__name__", "") == "make_inputs_require_grads"}

    def _leaf_paths(self, flagged: list[torch.nn.Module]) -> tuple[str, ...]:
        """The flagged modules none of whose descendants is flagged (the decoder layers); kept
        per flagged set, as every training call asks."""
        key = tuple(map(id, flagged))
        if key not in self.leaf_paths:
            ids = set(key)
            paths = [p for p, m in self.modules.items() if id(m) in ids]
            self.leaf_paths = {key: tuple(p for p in paths if p and not any(q.startswith(p + ".") for q in paths))}
        return self.leaf_paths[key]

    def layer_of(self, node: Node) -> str | None:
        path = node.meta.get("graft_module") or self.module_of(node)[0]
        for layer in self.checkpoint_layers:
            if path == layer or path.startswith(layer + "."):
                return layer
        return None

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.report.graphs += 1
        try:
            return self._rewrite(gm, example_inputs)
        except Exception as exc:  # never crash the user's model: run this graph as captured
            self.report.add_fallback(
                None, None, f"rewriting a graph failed, it runs unchanged: {type(exc).__name__}: {exc}"
            )
            if self.strict:
                raise
            return _RewrittenGraph(self, gm, [])

    def _rewrite(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> _RewrittenGraph:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        matches, rejections = find_matches(
            gm.graph, self.patterns, self.module_of, self.modules, dict(zip(placeholders, example_inputs))
        )
        for r in rejections:
            self.report.add_fallback(r.pattern, r.module, r.reason)
        new = [m for m in matches if m.key not in self.decisions]
        checks = {}
        if self.verify and new:
            names = {
                n: self.param_names[id(v)] for n, v in zip(placeholders, example_inputs) if id(v) in self.param_names
            }
            checks = {m.key: check for m, check in zip(new, check_matches(gm, example_inputs, new, names))}
        for m in new:
            check = checks.get(m.key)
            passed = check is None or check.passed
            self.decisions[m.key] = passed
            self.report.matches.append(_record(m, check, passed))
        graph = _RewrittenGraph(self, gm, matches)
        self.graphs.append(graph)
        return graph

    def replayer(self) -> Replayer | None:
        """A CUDA-graph replayer for one captured graph (None when turned off)."""
        if not self.cuda_graphs:
            return None

        def status(line: str, failed: bool) -> None:
            self.report.cuda_graphs = line
            if failed:
                self.report.add_fallback("cuda_graphs", None, line.removeprefix("off: "))
                if self.strict:
                    raise GraftError(f"graft: CUDA graphs {line}")

        loss_bounds = {dtype: bounds[0] for dtype, bounds in WHOLE_MODEL_BOUNDS.items()}
        replayer = Replayer(status, loss_bounds, lambda: self.call_inputs)
        self.replayers.append(replayer)
        return replayer

    # -- verifying -------------------------------------------------------------------------
    def first_call(self, model: torch.nn.Module, sample: dict[str, Any]) -> None:
        """Capture (and verify) on the sample, through the user's own model object (a PEFT
        wrapper adds kwargs of its own), so training reuses this graph and the report exists
        when optimize returns."""
        was_training = self.hf.training
        self.hf.train()
        params = [(n, p) for n, p in self.hf.named_parameters() if p.requires_grad]
        stashed = {n: p.grad for n, p in params}
        self.verifying = True
        try:
            if not self.verify:
                with torch.random.fork_rng(devices=_cuda_devices(self.hf)), torch.enable_grad():
                    model(**sample)
                return
            reference = self._loss_and_grads(model, sample, params, original=True)
            # The original against itself: the spread of nondeterministic kernels (atomics in
            # GPU attention backward), below which no difference can be blamed on a rewrite.
            spread = self._compare(reference, self._loss_and_grads(model, sample, params, original=True))
            check = self._compare(reference, self._loss_and_grads(model, sample, params), spread)
            if not check.passed:
                check = self._revert_culprit(model, reference, spread, sample, params, check)
            self.report.whole_model = check
        finally:
            self.verifying = False
            for n, p in params:
                p.grad = stashed[n]
            self.hf.train(was_training)

    def _loss_and_grads(self, model, sample, params, original: bool = False, seed: int = 0):
        for _, p in params:
            p.grad = None
        self.bypass = original
        try:
            with torch.random.fork_rng(devices=_cuda_devices(self.hf)), torch.enable_grad():
                torch.manual_seed(seed)
                out = model(**sample)
                loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().square().mean()
                loss.backward()
        finally:
            self.bypass = False
        grads = {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
        for _, p in params:
            p.grad = None
        return loss.detach().float().item(), grads

    def _compare(self, reference, other, spread: WholeModelCheck | None = None) -> WholeModelCheck:
        """Loss, and all trainable gradients as one vector (per-parameter ratios of tiny
        gradients say nothing): relative differences, and the bounds they must meet."""
        (loss_a, grads_a), (loss_b, grads_b) = reference, other
        dtype = getattr(self.hf, "dtype", torch.float32)
        loss_bound, grad_bound = WHOLE_MODEL_BOUNDS.get(dtype, WHOLE_MODEL_BOUNDS[torch.float32])
        if spread is not None:
            loss_bound = max(loss_bound, SPREAD_FACTOR * spread.loss_error)
            grad_bound = max(grad_bound, SPREAD_FACTOR * spread.grad_error)
        norm2 = diff2 = 0.0
        worst, worst_name = -1.0, ""
        for name in grads_a.keys() | grads_b.keys():
            a, b = grads_a.get(name), grads_b.get(name)
            a = a.double() if a is not None else torch.zeros_like(b, dtype=torch.float64)
            b = b.double() if b is not None else torch.zeros_like(a)
            d = (a - b).norm().item() if torch.isfinite(b).all() else math.inf
            norm2 += a.norm().item() ** 2
            diff2 += d**2
            if d > worst:
                worst, worst_name = d, name
        return WholeModelCheck(
            dtype=str(dtype).removeprefix("torch."),
            loss_original=loss_a,
            loss_rewritten=loss_b,
            loss_error=relative_error(torch.tensor(loss_b), torch.tensor(loss_a)),
            grad_error=math.sqrt(diff2 / norm2) if norm2 > 0 else math.sqrt(diff2),
            grad_worst=worst_name,
            loss_bound=loss_bound,
            grad_bound=grad_bound,
            spread_loss=spread.loss_error if spread else 0.0,
            spread_grad=spread.grad_error if spread else 0.0,
        )

    def _revert_culprit(self, model, reference, spread, sample, params, failed: WholeModelCheck) -> WholeModelCheck:
        """The whole model disagrees although each replacement passed alone: revert one
        pattern at a time until it agrees; if none suffices, revert them all."""
        applied = list(dict.fromkeys(k[0] for k, ok in self.decisions.items() if ok))
        for name in applied + [None]:
            reverted = [k for k, ok in self.decisions.items() if ok and (name is None or k[0] == name)]
            for k in reverted:
                self.decisions[k] = False
            self._rebuild()
            check = self._compare(reference, self._loss_and_grads(model, sample, params), spread)
            if check.passed or name is None:
                why = (
                    f"whole-model check failed (loss rel {failed.loss_error:.1e}, gradients rel "
                    f"{failed.grad_error:.1e}, bound {failed.grad_bound:.0e}); reverted"
                )
                for rec in self.report.matches:
                    if (rec.pattern, rec.module) in {(k[0], k[1]) for k in reverted}:
                        rec.status, rec.reason = "reverted", why
                self.report.add_fallback(name, None, why)
                return check
            for k in reverted:
                self.decisions[k] = True
        raise AssertionError("unreachable")

    def _rebuild(self) -> None:
        for graph in self.graphs:
            graph.rebuild()


def _record(m: Match, check, passed: bool) -> MatchRecord:
    rec = MatchRecord(
        pattern=m.pattern.name,
        module=m.module,
        nodes=[n.name for n in m.nodes],
        dropped=[n.name for n in m.dropped],
        replacement=getattr(m.replace, "__name__", ""),
        status="unverified" if check is None else ("applied" if passed else "reverted"),
    )
    if check is not None:
        rec.comparisons = [
            {"what": c.what, "ours": c.ours, "eager": c.eager, "bound": c.bound, "dtype": c.dtype}
            for c in check.comparisons
        ]
        rec.saved_bytes_eager, rec.saved_bytes_ours = check.saved_bytes_eager, check.saved_bytes_ours
        if not passed:
            worst = check.worst
            rec.reason = check.error or (
                f"verification failed: {worst.what} error {worst.ours:.2e} > bound {worst.bound:.2e} "
                f"(eager {worst.eager:.2e})"
            )
    return rec


def _cuda_devices(model: torch.nn.Module) -> list[torch.device]:
    return list({p.device for p in model.parameters() if p.is_cuda})
