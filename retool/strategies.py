"""The sharded strategy, FSDP2 (``strategy: fsdp2``), and what the algorithm asks of any sharded strategy.

Lightning starts the processes and owns the process group; a sharded strategy splits the model's parameters
among the processes, and an RL step needs three things of it (a fourth is optional):

- ``shard_module(module)``: split a module's parameters (called by the algorithm, for the policy and every
  module that trains or scores with it: the reference model, PPO's critic);
- ``full_weights(module)``: a context in which the module holds its whole parameters, so that a rollout can
  decode with it, each rank as many steps as its own trajectories need (a sharded forward pass is a collective
  that every rank would have to run in step);
- ``full_state_dict(module)``: every parameter whole, on every rank or on rank 0 only (the export);
- ``gradient_sync(module, enabled)`` (optional): a context for one backward pass that reduces gradients only
  at the optimizer step's last micro-batch.

The algorithm looks these up on whatever strategy runs it (:meth:`retool.Algorithm.configure_model`), so a
strategy of a user's own that offers them is handled the same way. ``ddp`` needs none of them: every rank
holds the whole model. DeepSpeed ZeRO is not wired in yet.

``fsdp2`` also runs on CPU (gloo), where the equivalence tests run it; Lightning's own ``fsdp`` refuses a CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

STRATEGIES = {
    "ddp": "every process holds the whole model, its gradients and optimizer state; gradients are averaged",
    "fsdp2": "each process holds a share of every parameter, gradient and optimizer state (FSDP2, per decoder layer)",
}
"""The ``trainer.strategy`` names retool's step runs, with what each process holds (``--trainer.help`` prints
them). Lightning's ``fsdp`` and ``deepspeed_*`` are refused; DeepSpeed ZeRO is not wired in yet."""


def _layer_classes(module: torch.nn.Module) -> set[str]:
    """Names of the classes to shard one by one: the blocks Hugging Face models list in ``_no_split_modules``
    (a decoder layer); the parameters outside them (embeddings, final norm, head) go with the root."""
    names: set[str] = set()
    for sub in module.modules():
        names.update(getattr(sub, "_no_split_modules", None) or ())
    return names


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism with PyTorch's FSDP2 (``fully_shard``) over every process.

    Each decoder layer is one unit: its parameters, gradients and optimizer state are split among the
    processes, gathered for its forward and backward passes and freed after (``reshard_after_forward``).
    Gradients are reduce-scattered once per optimizer step (micro-batches accumulate unsharded, without
    communication, until the last), and clipping computes the norm over every shard. Decoding gathers the
    whole model once per rollout (see :meth:`full_weights`). Select it with ``trainer.strategy: fsdp2``;
    ``trainer.devices`` and ``trainer.num_nodes`` say how many processes share the model.

    Args:
        reshard_after_forward: Free each layer's gathered parameters after its forward pass and gather them
            again for the backward (less memory, more communication); ``False`` keeps them until the backward.
        **kwargs: Lightning's ``ModelParallelStrategy`` options (``process_group_backend``, ``timeout``,
            ``save_distributed_checkpoint``); every process is data-parallel (no tensor parallelism).
    """

    strategy_name = "fsdp2"

    def __init__(self, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        kwargs.pop("data_parallel_size", None)
        kwargs.pop("tensor_parallel_size", None)
        super().__init__(**kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Every process is one data-parallel shard; Lightning's "auto" would make the processes of a machine one
        # tensor-parallel group, which needs a model-specific plan.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Shard ``module`` in place: each decoder layer on its own, then the rest with the root."""
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        layers = _layer_classes(module)
        for sub in list(module.modules()):
            if sub is not module and type(sub).__name__ in layers:
                fully_shard(sub, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        return module

    @contextlib.contextmanager
    def full_weights(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """While open, ``module`` holds its whole parameters and its forward passes gather nothing.

        One all-gather per layer on entry, the same on every rank; inside, each rank runs as many forward
        passes as it likes (a rollout decodes until its own trajectories end). The memory is the whole
        model's, as during a forward pass of the largest layers put together.
        """
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield module
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    def full_state_dict(self, module: torch.nn.Module, rank_zero_only: bool = False) -> dict[str, torch.Tensor]:
        """``module``'s state dict with every tensor whole, on CPU; with ``rank_zero_only``, empty on the other
        ranks (each layer is gathered and moved off the device one at a time). Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if rank_zero_only:
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(module, options=options)
        else:
            state = {name: whole(value).cpu() for name, value in module.state_dict().items()}
        return _tie_shared(module, state)

    @contextlib.contextmanager
    def gradient_sync(self, module: torch.nn.Module, enabled: bool) -> Iterator[None]:
        """Backward passes inside reduce-scatter their gradients only if ``enabled`` (the optimizer step's last
        micro-batch); the others accumulate unsharded gradients locally."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(True)


def _tie_shared(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the entries of a parameter shared under several names (tied input and output embeddings) one
    tensor again: gathered, they are copies, and ``save_pretrained`` recognises a tie by shared storage."""
    first: dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(parameter), name)
        if seen != name and seen in state and name in state:
            state[name] = state[seen]
    return state


def whole(value: torch.Tensor) -> torch.Tensor:
    """``value`` whole: a sharded tensor (FSDP2's DTensor) gathered from every rank (all ranks must call it
    together), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def whole_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: the norm over every shard when the gradients were sharded (a DTensor)."""
    return float(whole(norm))


def register() -> None:
    """Make ``trainer.strategy: fsdp2`` a name Lightning knows (idempotent)."""
    if FSDP2Strategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(
            FSDP2Strategy.strategy_name,
            FSDP2Strategy,
            description="FSDP2 (fully_shard) over every process, with retool's decoding, export and clipping",
        )


register()
