"""Peak resident memory of one lm_head + cross-entropy forward and backward on the CPU, fused
or eager, in a process of its own (run by tests/test_linear_cross_entropy.py).

    python tests/loss_memory_probe.py fused|eager [tokens hidden vocab]

Prints one JSON line: the resident bytes once the inputs exist, the peak during forward and
backward (VmHWM, reset just before; ru_maxrss where the reset is not allowed), and the loss.
The fused op runs its real CPU path: PyTorch for the per-row step (TRITON_INTERPRET unset)."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def forward_backward(variant: str, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> float:
    fn = linear_cross_entropy if variant == "fused" else linear_cross_entropy_reference
    x.grad = None
    loss = fn(x, w, labels)
    loss.backward()
    return loss.item()


def main() -> None:
    variant = sys.argv[1]
    tokens, hidden, vocab = (int(v) for v in sys.argv[2:5]) if len(sys.argv) > 2 else (8192, 512, 32000)
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16) * hidden**-0.5  # frozen, as under LoRA
    labels = torch.randint(0, vocab, (tokens,))
    labels[::7] = -100
    small = (x[:64].detach().requires_grad_(), w[:1000], labels[:64] % 1000)
    forward_backward(variant, *small)  # load kernels and thread pools outside the measurement
    before = status_kib("VmRSS") * 1024
    exact = reset_peak()
    loss = forward_backward(variant, x, w, labels)
    if exact:
        peak = status_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "before": before, "peak": peak, "loss": loss, "exact": exact}))


if __name__ == "__main__":
    main()
