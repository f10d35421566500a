"""Report: what matched where, what did not and why, verification errors, memory saved."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class MatchRecord:
    pattern: str
    module: str
    nodes: list[str]
    status: str  # "applied", "reverted" (failed verification) or "unverified" (verify=False)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # what, ours, eager, bound
    saved_bytes_eager: int = 0  # activations autograd keeps for this subgraph, on the sample
    saved_bytes_ours: int = 0
    reason: str | None = None
    dropped: list[str] = field(default_factory=list)  # graph outputs now returned as None
    replacement: str = ""  # the function that runs instead (a pattern's `choose` may pick a flavour)

    @property
    def worst(self) -> dict[str, Any] | None:
        return max(self.comparisons, key=lambda c: c["ours"] / max(c["bound"], 1e-30), default=None)


@dataclass
class Fallback:
    pattern: str | None
    module: str | None
    reason: str


@dataclass
class WholeModelCheck:
    dtype: str
    loss_original: float
    loss_rewritten: float
    loss_error: float  # relative
    grad_error: float  # relative difference of all trainable gradients, as one vector
    grad_worst: str  # the parameter whose gradient differs most
    loss_bound: float
    grad_bound: float
    spread_loss: float = 0.0  # the original model against itself (nondeterministic kernels)
    spread_grad: float = 0.0

    @property
    def passed(self) -> bool:
        return self.loss_error <= self.loss_bound and self.grad_error <= self.grad_bound


@dataclass
class RewriteReport:
    model_type: str
    patterns: list[str] = field(default_factory=list)
    matches: list[MatchRecord] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    whole_model: WholeModelCheck | None = None
    graphs: int = 0
    graph_breaks: dict[str, int] = field(default_factory=dict)
    sample_tokens: int = 0
    verify: bool = True
    checkpointing: str = "off"  # activation checkpointing of the rewritten graph
    masks: str = "traced"  # how the graph gets its attention masks (rewriter/capture.py)
    cuda_graphs: str = "off"  # whether training steps replay CUDA graphs (rewriter/cuda_graphs.py)

    def counts(self) -> dict[str, int]:
        """Pattern name -> replacements in effect (every pattern of the set, zeros included)."""
        applied = Counter(m.pattern for m in self.matches if m.status != "reverted")
        return {name: applied.get(name, 0) for name in dict.fromkeys(self.patterns + list(applied))}

    @property
    def verified(self) -> bool:
        """Verification ran, every replacement in effect passed it, and so did the whole model."""
        return (
            self.verify
            and self.whole_model is not None
            and self.whole_model.passed
            and all(m.status == "applied" for m in self.matches if m.status != "reverted")
        )

    @property
    def activation_bytes_saved(self) -> int:
        """On the sample: bytes autograd keeps in the original subgraphs minus in ours."""
        return sum(m.saved_bytes_eager - m.saved_bytes_ours for m in self.matches if m.status != "reverted")

    def add_fallback(self, pattern: str | None, module: str | None, reason: str) -> None:
        fallback = Fallback(pattern, module, reason)
        if fallback not in self.fallbacks:
            self.fallbacks.append(fallback)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = self.counts()
        data["verified"] = self.verified
        data["activation_bytes_saved"] = self.activation_bytes_saved
        if self.whole_model is not None:
            data["whole_model"]["passed"] = self.whole_model.passed
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def details(self) -> str:
        """One line per match."""
        lines = []
        for m in self.matches:
            worst = m.worst
            err = f"err {worst['ours']:.2e} (eager {worst['eager']:.2e}, {worst['what']})" if worst else "not checked"
            mem = f"saved {_bytes(m.saved_bytes_eager)} -> {_bytes(m.saved_bytes_ours)}"
            lines.append(f"{m.status:<10} {m.pattern:<14} {m.module:<40} {len(m.nodes):>3} nodes  {mem:<26} {err}")
            if m.reason:
                lines.append(f"{'':<11}{m.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        status = "verified" if self.verified else ("NOT verified" if self.verify else "verification off")
        breaks = sum(self.graph_breaks.values())
        lines = [
            f"graft rewrite report: model_type={self.model_type!r}, {self.graphs} graph(s), "
            f"{breaks} graph break(s), {status}, checkpointing {self.checkpointing}",
            f"  attention masks: {self.masks}",
            f"  cuda graphs: {self.cuda_graphs}",
        ]
        if self.matches:
            lines.append(
                f"  {'pattern':<22} {'applied':>7} {'reverted':>8}  {'worst err ours / eager':>24}  "
                f"{'saved activations, eager -> ours, per token':>44}"
            )
        for name in dict.fromkeys(m.pattern for m in self.matches):
            ms = [m for m in self.matches if m.pattern == name]
            kept = [m for m in ms if m.status != "reverted"]
            worst = max((m.worst for m in kept if m.worst), key=lambda c: c["ours"], default=None)
            err = f"{worst['ours']:.1e} / {worst['eager']:.1e}" if worst else "-"
            tokens = max(self.sample_tokens, 1)
            eager = sum(m.saved_bytes_eager for m in kept) / tokens
            ours = sum(m.saved_bytes_ours for m in kept) / tokens
            mem = f"{_bytes(eager)} -> {_bytes(ours)}"
            lines.append(f"  {name:<22} {len(kept):>7} {len(ms) - len(kept):>8}  {err:>24}  {mem:>44}")
        if self.whole_model is not None:
            w = self.whole_model
            lines.append(
                f"  whole model ({w.dtype}): loss {w.loss_original:.6g} -> {w.loss_rewritten:.6g} "
                f"(rel {w.loss_error:.1e}, bound {w.loss_bound:.0e}); gradients rel {w.grad_error:.1e} "
                f"(bound {w.grad_bound:.0e}; original vs itself {w.spread_grad:.0e})"
            )
        for name in dict.fromkeys(m.pattern for m in self.matches if m.dropped and m.status != "reverted"):
            dropped = sorted({d for m in self.matches if m.pattern == name for d in m.dropped})
            lines.append(f"  {name}: in training these graph outputs are returned as None: {', '.join(dropped)}")
        for reason, count in self.graph_breaks.items():
            lines.append(f"  graph break x{count}: {reason.strip().splitlines()[0]}")
        for f in self.fallbacks:
            where = " ".join(x for x in (f.pattern, f.module) if x)
            lines.append(f"  fallback {where}: {f.reason}" if where else f"  fallback: {f.reason}")
        for m in self.matches:
            if m.status == "reverted":
                lines.append(f"  reverted {m.pattern} {m.module}: {m.reason}")
        return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
