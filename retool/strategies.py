"""The sharded strategies, FSDP2 (``fsdp2``) and DeepSpeed ZeRO (``deepspeed_stage_2``, ``deepspeed_stage_3``).

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
holds the whole model.

Both also run on CPU (gloo), where the equivalence tests run them; Lightning's own ``fsdp`` and
``deepspeed_*`` refuse a CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, StrategyRegistry

STRATEGIES = {
    "ddp": "every process holds the whole model, its gradients and optimizer state; gradients are averaged",
    "fsdp2": "each process holds a share of every parameter, gradient and optimizer state (FSDP2, per decoder layer)",
    "deepspeed_stage_2": "DeepSpeed ZeRO-2: gradients and optimizer state sharded, weights whole (one trained module)",
    "deepspeed_stage_3": "DeepSpeed ZeRO-3: weights sharded too (one trained module: not PPO)",
}
"""The ``trainer.strategy`` names retool's step runs, with what each process holds (``--trainer.help`` prints
them). Lightning's ``fsdp`` (FSDP1) and its other ``deepspeed_*`` names are refused."""


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
        options = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": self.mixed_precision(),
        }
        for sub in list(module.modules()):
            if sub is not module and type(sub).__name__ in layers:
                fully_shard(sub, **options)
        fully_shard(module, **options)
        return module

    def mixed_precision(self) -> Any:
        """FSDP2's mixed-precision policy for ``trainer.precision``: under ``bf16-mixed`` each layer is gathered in
        bf16 and computes in it, while the shards each process keeps (the weights the optimizer steps, and its
        state) stay in the model's dtype (float32) and gradients are reduced in float32; otherwise no casting."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if str(self.precision_plugin.precision) == "bf16-mixed":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

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

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading, but a sharded checkpoint (a folder: every process reads its own shards) may lack
        the modules the algorithm rebuilds rather than saves (``frozen_prefixes``: a KL reference model)."""
        from pathlib import Path

        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        module = self.lightning_module
        assert module is not None
        frozen = _frozen_prefixes(module)
        state = get_model_state_dict(module)
        saved = {name: value for name, value in state.items() if not name.startswith(frozen)}
        load({"state_dict": saved}, checkpoint_id=path)
        state.update(saved)  # the frozen modules keep the weights they were rebuilt with
        module.load_state_dict(state, strict=True)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(
                module, optimizer, optim_state_dict=optimizer_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return torch.load(path / "meta.pt", weights_only=weights_only)

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


def _frozen_prefixes(module: Any) -> tuple[str, ...]:
    """The state-dict prefixes of the modules ``module`` (the algorithm) rebuilds rather than saves in a
    checkpoint (:meth:`retool.Algorithm.frozen_prefixes`); none for a module without them."""
    return tuple(getattr(module, "frozen_prefixes", tuple)())


def _tie_shared(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the entries of a parameter shared under several names (tied input and output embeddings) one
    tensor again: gathered, they are copies, and ``save_pretrained`` recognises a tie by shared storage."""
    first: dict[int, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(parameter), name)
        if seen != name and seen in state and name in state:
            state[name] = state[seen]
    return state


class DeepSpeedZeRO(DeepSpeedStrategy):
    """DeepSpeed ZeRO stage 2 or 3 through Lightning's ``DeepSpeedStrategy``, on GPUs and on CPU (gloo).

    Stage 2 shards gradients and optimizer state (every process holds the whole weights); stage 3 also shards
    the weights. DeepSpeed's engine clips (``gradient_clipping`` is set from the algorithm's ``max_grad_norm``)
    and steps; the gradient norm logged is the one it computed. Micro-batches reduce once per optimizer step
    (the engine's accumulation boundary is the last micro-batch). For a rollout under stage 3 every parameter
    of the module (the policy and, when there is one, the reference model) is gathered and DeepSpeed's
    per-module hooks are lifted, so each process decodes on its own; the export gathers the parameters.
    DeepSpeed takes one optimizer, so it trains one module: GRPO, RLOO and SFT, not PPO (policy and critic).
    Select it with ``trainer.strategy: deepspeed_stage_2`` or ``deepspeed_stage_3``.

    The model is loaded whole on every process and partitioned when the engine starts (not created inside
    ``deepspeed.zero.Init``): a model must fit in one process's CPU memory to be loaded.

    Args:
        stage: The ZeRO stage, 2 or 3.
        **kwargs: Lightning's ``DeepSpeedStrategy`` options (``config``, ``offload_optimizer``, ...).
    """

    strategy_name = "deepspeed_zero"
    max_optimizers = 1

    def __init__(self, stage: int = 2, **kwargs: Any) -> None:
        if stage not in (2, 3):
            raise ValueError(f"retool runs ZeRO stage 2 or 3, got stage {stage}")
        # DeepSpeed's batch size only feeds its throughput logs; Lightning would read it from the data loader.
        kwargs.setdefault("logging_batch_size_per_gpu", 1)
        # A checkpoint leaves out the frozen modules (a KL reference model): the algorithm rebuilds them.
        kwargs.setdefault("exclude_frozen_parameters", True)
        super().__init__(stage=stage, **kwargs)
        self.stage = stage
        self._hold_weights = False

    @property
    def shards_parameters(self) -> bool:
        return self.stage == 3

    def setup_environment(self) -> None:
        # Lightning's DeepSpeed set-up refuses any accelerator but CUDA; DDP's runs on CPU too. DeepSpeed needs
        # a device index per process, which Lightning's CPU devices lack.
        if self.parallel_devices and all(d.type == "cpu" for d in self.parallel_devices):
            self.parallel_devices = [torch.device("cpu", i) for i in range(len(self.parallel_devices))]
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def setup(self, trainer: Any) -> None:
        self.precision_plugin = _RecordBatchesPrecision(self.precision_plugin.precision)
        self._init_config_if_needed()
        assert isinstance(self.config, dict)
        limit = float(getattr(trainer.lightning_module, "max_grad_norm", 0.0) or 0.0)
        self.config["gradient_clipping"] = limit if limit > 0 else 0.0
        super().setup(trainer)

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        # Loaded whole, partitioned by the engine: Hugging Face's loading does not fill parameters that
        # zero.Init has already partitioned.
        yield

    def shard_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """Nothing to do here: the engine partitions every parameter of the training module when it starts."""
        return module

    @contextlib.contextmanager
    def full_weights(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.stage != 3:
            yield module
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(self.model):  # every parameter of the engine's module, gathered
            yield module

    def full_state_dict(self, module: torch.nn.Module, rank_zero_only: bool = False) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return module.state_dict()
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}
        return _tie_shared(module, state)

    @contextlib.contextmanager
    def gradient_sync(self, module: torch.nn.Module, enabled: bool) -> Iterator[None]:
        engine = self.model
        # What the engine's own forward does first: the micro-step count that makes a backward pass accumulate
        # into the gradients of the previous ones (instead of replacing them) advances there, and retool's
        # passes call the modules themselves, not the engine.
        clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        engine.set_gradient_accumulation_boundary(enabled)
        yield

    def grad_norm_after_step(self) -> float:
        """The gradient norm (before clipping) the engine computed in its last step."""
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    @contextlib.contextmanager
    def without_update(self) -> Iterator[None]:
        """Optimizer steps inside count (Lightning's step counter) but leave the weights and the optimizer's
        state alone: DeepSpeed would step even with no gradients, and its moments would move the weights."""
        self._hold_weights = True
        try:
            yield
        finally:
            self._hold_weights = False

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Lightning's saving (every process writes its shards into the folder ``filepath``) without the frozen
        modules the algorithm rebuilds (``frozen_prefixes``). DeepSpeed's ``exclude_frozen_parameters`` alone
        keeps a frozen tied weight under its second name (a reference model's ``lm_head``, the size of its
        embedding matrix)."""
        module = self.deepspeed_engine.module
        frozen = _frozen_prefixes(self.lightning_module)
        if not frozen:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        everything = module.state_dict

        def without_frozen(*args: Any, **kwargs: Any) -> dict[str, Any]:
            state = everything(*args, **kwargs)
            for name in [name for name in state if name.startswith(frozen)]:
                del state[name]
            return state

        module.state_dict = without_frozen  # what DeepSpeed's engine calls for the module's weights
        try:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        finally:
            del module.state_dict  # the class's method again

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading (DeepSpeed's engine reads its own shards), not strict about the modules the
        algorithm rebuilds rather than saves (``frozen_prefixes``: a KL reference model), which the checkpoint
        leaves out (``exclude_frozen_parameters``)."""
        module = self.lightning_module
        if not _frozen_prefixes(module):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        strict = module.strict_loading
        module.strict_loading = False
        try:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        finally:
            module.strict_loading = strict

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if self._hold_weights:
            return closure()
        return super().optimizer_step(optimizer, closure, model, **kwargs)


class _RecordBatchesPrecision(DeepSpeedPrecision):
    """DeepSpeed's precision plugin for batches that are lists of records (problems, traces: frozen dataclasses
    of text), which hold no tensor to cast and which Lightning's version refuses to walk."""

    def convert_input(self, data: Any) -> Any:
        if isinstance(data, (list, tuple)) and not any(isinstance(item, torch.Tensor) for item in data):
            return data
        return super().convert_input(data)


def whole(value: torch.Tensor) -> torch.Tensor:
    """``value`` whole: a sharded tensor (FSDP2's DTensor) gathered from every rank (all ranks must call it
    together), anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def whole_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number: the norm over every shard when the gradients were sharded (a DTensor)."""
    return float(whole(norm))


def register() -> None:
    """Make ``fsdp2``, ``deepspeed_stage_2`` and ``deepspeed_stage_3`` names of retool's strategies (the DeepSpeed
    ones replace Lightning's of the same name, which retool's step cannot run)."""
    if (dict.get(StrategyRegistry, "fsdp2") or {}).get("strategy") is not FSDP2Strategy:
        StrategyRegistry.register(
            "fsdp2",
            FSDP2Strategy,
            description="FSDP2 (fully_shard) over every process, with retool's decoding, export and clipping",
            override=True,
        )
    for stage in (2, 3):
        name = f"deepspeed_stage_{stage}"
        if (dict.get(StrategyRegistry, name) or {}).get("strategy") is not DeepSpeedZeRO:
            StrategyRegistry.register(
                name, DeepSpeedZeRO, description=f"DeepSpeed ZeRO stage {stage} (retool's)", override=True, stage=stage
            )


register()
