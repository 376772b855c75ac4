"""What an algorithm does with several processes: the strategy's hooks, gradient averaging, token counts.

A mixin of :class:`~retool.algorithm.Algorithm`. The core names no strategy: it looks up what a sharded
strategy offers (``shard_module``, ``full_weights``, ``full_state_dict``, ``gradient_sync``,
``grad_norm_after_step``, ``without_update``, ``max_optimizers``; see :mod:`retool.strategies`) on whatever
strategy runs it, and under DDP averages gradients itself (see :meth:`Processes.manual_backward`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from retool import distributed


class Processes(L.LightningModule):
    """The multi-process half of :class:`~retool.algorithm.Algorithm` (its ``model`` is the policy)."""

    model: torch.nn.Module | None
    _averages_gradients: bool

    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self._averages_gradients = isinstance(self.trainer.strategy.model, DistributedDataParallel)

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if not self._averages_gradients:
            return super().manual_backward(loss, *args, **kwargs)
        # DDP's reducer averages gradients during a backward pass and needs every rank to run the same passes
        # over the same parameters. An RL step does not: a rank may have nothing to learn from, a critic trains
        # alone during its warm-up, policy and critic take different micro-batches. So every pass runs without
        # the reducer, and sync_gradients averages each module once per optimizer step.
        with self.trainer.strategy.model.no_sync():
            return super().manual_backward(loss, *args, **kwargs)

    def _strategy_hook(self, name: str) -> Any:
        """The running strategy's ``name`` (see :mod:`retool.strategies`), or ``None`` when it has none (one
        process, DDP) or the module runs without a trainer."""
        trainer = self._trainer
        return getattr(trainer.strategy, name, None) if trainer is not None else None

    @property
    def lockstep_passes(self) -> bool:
        """Whether every forward or backward pass of a trained module is a collective (FSDP2, DeepSpeed), which
        every rank must run as many times as the others: a rank with nothing of its own to learn from then runs
        passes that teach nothing. (DDP's are not: retool averages its gradients once per optimizer step.)"""
        return self._strategy_hook("shard_module") is not None and distributed.world_size() > 1

    @property
    def shards_parameters(self) -> bool:
        """Whether each process holds only a share of the weights (FSDP2, ZeRO-3): they can only be gathered
        with every rank taking part."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        shards = getattr(strategy, "shards_parameters", hasattr(strategy, "shard_module"))
        return bool(shards) and distributed.world_size() > 1

    def full_weights(self, module: torch.nn.Module | None = None) -> contextlib.AbstractContextManager[Any]:
        """A context in which ``module`` (default: the policy) holds its whole parameters, so a rollout can
        decode with it, each rank for as many steps as its own trajectories need. Every rank must enter it
        together; with a strategy that does not shard, it does nothing."""
        module = module if module is not None else self.model
        hook = self._strategy_hook("full_weights")
        return hook(module) if hook is not None else contextlib.nullcontext(module)

    def full_state_dict(self, module: torch.nn.Module | None = None, rank_zero_only: bool = False) -> dict[str, Any]:
        """``module``'s (default: the policy's) state dict with every tensor whole (gathered from the shards
        under a sharding strategy; every rank must call it then). With ``rank_zero_only`` the other ranks may
        get an empty dict."""
        module = module if module is not None else self.model
        assert module is not None
        hook = self._strategy_hook("full_state_dict")
        return hook(module, rank_zero_only=rank_zero_only) if hook is not None else module.state_dict()

    def gradient_sync(self, module: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
        """A context for one backward pass of ``module``: under a sharding strategy, gradients are reduced
        among the processes only if ``enabled`` (the optimizer step's last micro-batch of that module)."""
        hook = self._strategy_hook("gradient_sync")
        return hook(module, enabled) if hook is not None else contextlib.nullcontext()

    def sync_gradients(self, module: torch.nn.Module) -> None:
        """Make ``module``'s gradients the mean over the ranks, before clipping and the optimizer step.

        Under DDP (replicated weights) retool averages them itself (see :meth:`manual_backward`); on one process
        there is nothing to do.
        """
        if self._averages_gradients:
            distributed.average_gradients(module.parameters())

    def token_normalizer(self, local_tokens: torch.Tensor | float) -> torch.Tensor:
        """What a loss summed over this rank's tokens is divided by, so that the gradient averaged over the
        ranks is the per-token mean over every rank's tokens: a run on N processes takes the step a run on one
        takes over the same global batch. The tokens of all ranks, over N (at least 1)."""
        total = distributed.sum_across({"tokens": float(local_tokens)})["tokens"]
        return torch.tensor(max(total, 1.0) / distributed.world_size(), dtype=torch.float32)


def share_by_tokens(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """Which rows (indices into ``lengths``) each of ``ranks`` processes trains on, so that their token counts are
    close: the longest row first, each to the rank with the fewest tokens so far (the lowest rank on a tie). Every
    rank gets a row while there are as many rows as ranks, and no rank ends more than the longest row above the
    mean. The same on every rank (it depends on the lengths only); each rank's rows are in their given order."""
    loads = [0] * ranks
    shares: list[list[int]] = [[] for _ in range(ranks)]
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(ranks), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(row)
        loads[rank] += lengths[row]
    return [sorted(share) for share in shares]
