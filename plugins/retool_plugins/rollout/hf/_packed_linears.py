"""Linear layers that decode through oneDNN with weights reordered for it, on CPU.

For the few rows of a decode step, PyTorch's default CPU matrix multiply (MKL's sgemm) runs far below the
machine's memory bandwidth, while oneDNN with the weight reordered once into its blocked layout runs close
to it (the docs page "Rollouts" has the measurements). The reordered copies are made when a rollout starts
and dropped when it ends, so they always hold the weights the trainer has just updated. One or two rows go
to the default path, which is faster there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

_MIN_ROWS = 3  # below this many rows the default kernel is faster (measured: 1 row 34 vs 45 ms per step)


def available(model: torch.nn.Module) -> bool:
    """Whether oneDNN can run the model's linear layers: on CPU, in fp32 or bfloat16, with PyTorch's oneDNN."""
    parameter = next(model.parameters())
    return (
        parameter.device.type == "cpu"
        and parameter.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, batch_hint: int = 8) -> Iterator[int]:
    """While open, every ``nn.Linear`` of ``model`` computes with a reordered copy of its current weight.

    Yields how many layers were packed. Only the module instances' ``forward`` is replaced, and restored on
    exit, so the model trains as before once the rollout is over.
    """
    patched: list[torch.nn.Linear] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if type(module) is torch.nn.Linear and "forward" not in vars(module):
                    module.forward = _packed_forward(module, batch_hint)  # type: ignore[method-assign]
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def _packed_forward(linear: torch.nn.Linear, batch_hint: int) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias = linear.weight, linear.bias
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
    packed_bias = bias.detach() if bias is not None else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.numel() < _MIN_ROWS * x.shape[-1] or x.dtype != packed.dtype:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, packed_bias, "none", [], "")

    return forward
