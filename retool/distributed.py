"""What ranks must agree on, and how they combine what each computed: the few collectives an RL step needs.

Lightning's strategies (DDP, FSDP2 through ``ModelParallelStrategy``, DeepSpeed) start the processes, own the
process group and place the model; this module holds what an RL step adds on top. Each rank rolls out its own
share of the step's problems, so before anything is logged or decided the ranks combine: sums are summed,
per-trajectory numbers are gathered (small records, never the token ids), a decision taken on local data
(skip the update or not) is made the same on every rank. On one process every function here is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    """Processes in the run (1 when ``torch.distributed`` is not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (CPU) reduces CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the ranks (the keys must be the same on every rank, in any order)."""
    return _reduce(values, "sum")


def max_across(values: dict[str, float]) -> dict[str, float]:
    """Each value's maximum over the ranks (e.g. a time: the step waits for its slowest rank)."""
    return _reduce(values, "max")


def _reduce(values: dict[str, float], op: str) -> dict[str, float]:
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, tensor.cpu().tolist()))


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on at least one rank: a decision every rank then takes the same way."""
    return bool(max_across({"flag": float(flag)})["flag"])


def gather(items: Sequence[T]) -> list[T]:
    """Every rank's ``items`` concatenated in rank order, on every rank (picklable objects, CPU tensors included).

    Under NCCL the objects travel through a gloo group of the same processes, in CPU memory: NCCL would stage
    every rank's pickled bytes in GPU memory at once (an RL step's gathered batch can be hundreds of MB a rank).
    """
    if world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items), group=_object_group())
    return [item for part in parts for item in part]


_OBJECT_GROUPS: dict[Any, Any] = {}


def _object_group() -> Any:
    """The group objects are gathered in: the default one under gloo; under another backend, a gloo group of
    every process, made the first time (every rank calls :func:`gather` together, so every rank makes it)."""
    if dist.get_backend() == "gloo":
        return None
    default = dist.group.WORLD
    if default not in _OBJECT_GROUPS:
        _OBJECT_GROUPS[default] = dist.new_group(backend="gloo")
    return _OBJECT_GROUPS[default]


def average_gradients(parameters: Iterable[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Replace each gradient by its mean over the ranks.

    For data parallelism where every rank holds the whole module (DDP): retool runs DDP's backward passes
    without its reducer (see :meth:`retool.algorithm.Algorithm.manual_backward`) and averages here, once per
    optimizer step, in flat buckets of about ``bucket_bytes``. A parameter that has a gradient on some rank
    but not on this one (its passes were skipped) counts as zeros here; one that has none on any rank keeps
    none, so the optimizer leaves it alone as it would on one process.
    """
    if world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bucket: list[torch.Tensor] = []
    size = 0
    for p, anywhere in zip(params, flags.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _average(bucket)
            bucket, size = [], 0
    if bucket:
        _average(bucket)


def _average(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@dataclass
class Moments:
    """Count, sum and sum of squares of a set of numbers, so that a mean and a variance over every rank's
    numbers can be computed from one sum across ranks (see :func:`sum_across`)."""

    count: float = 0.0
    total: float = 0.0
    squares: float = 0.0

    @classmethod
    def of(cls, values: torch.Tensor) -> Moments:
        values = values.detach().double().reshape(-1)
        return cls(float(values.numel()), float(values.sum()), float((values * values).sum()))

    def as_dict(self, name: str) -> dict[str, float]:
        return {f"{name}:n": self.count, f"{name}:sum": self.total, f"{name}:sq": self.squares}

    @classmethod
    def from_dict(cls, values: dict[str, float], name: str) -> Moments:
        return cls(values[f"{name}:n"], values[f"{name}:sum"], values[f"{name}:sq"])

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def var(self) -> float:
        """Population variance (as ``Tensor.var(unbiased=False)``)."""
        if not self.count:
            return math.nan
        return max(self.squares / self.count - self.mean**2, 0.0)
