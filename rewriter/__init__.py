"""graft's rewriter: capture a model with TorchDynamo, match patterns, replace them with
fused kernels, verify against float64, report.

    from rewriter import optimize, report
    model = optimize(model)
    print(report(model))
"""

from rewriter.match import Match, Pattern
from rewriter.optimize import GraftError, optimize, report, synthesize_sample
from rewriter.registry import register_architecture, register_pattern, register_pattern_file
from rewriter.report import RewriteReport

__all__ = [
    "GraftError",
    "Match",
    "Pattern",
    "RewriteReport",
    "optimize",
    "register_architecture",
    "register_pattern",
    "register_pattern_file",
    "report",
    "synthesize_sample",
]
