"""The dataset contract: a LightningDataModule whose batches are lists of :class:`~retool.Problem` (for RL and
evaluation) or of :class:`~retool.Trace` (for supervised fine-tuning)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from retool.types import Problem, Trace


def _as_list(batch: list[Any]) -> list[Any]:
    # Problems and traces are not tensors: keep a batch as the plain list of dataclasses.
    return batch


class ProblemDataModule(L.LightningDataModule):
    """Base class of every dataset plugin.

    A subclass implements :meth:`load_problems`, and :meth:`load_traces` if it has worked solutions to
    fine-tune on; this class turns them into shuffled, seeded batches. What the training batches hold is the
    algorithm's choice (its ``train_on`` attribute): problems for RL, traces for SFT. Validation batches are
    always the ``val`` problems, which evaluation rolls out and scores. A training "epoch" is one pass over
    the training items; ``trainer.max_steps`` decides how many batches (steps) a run takes, cycling through
    epochs as needed.

    Args:
        batch_size: Problems per RL step (each is rolled out ``group_size`` times by the algorithm).
        seed: Seed of the shuffling order (and of generated problems, for generators).
        shuffle: Shuffle the training problems each epoch.
    """

    def __init__(self, batch_size: int = 2, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._splits: dict[str, list[Problem]] = {}
        self._traces: dict[str, list[Trace]] = {}

    @abstractmethod
    def load_problems(self, split: str) -> Sequence[Problem]:
        """Return the problems of ``split`` (``"train"`` or ``"val"``); an empty sequence if there are none."""

    def load_traces(self, split: str) -> Sequence[Trace]:
        """Return the worked solutions of ``split`` for supervised fine-tuning.

        The default has none: a dataset of bare problems can train RL but not SFT.
        """
        raise ValueError(
            f"{type(self).__name__} has no traces to fine-tune on; SFT needs a dataset that provides them "
            "(e.g. MathFamilies, which writes reference solutions, or TraceFile for your own JSONL/Parquet)"
        )

    def problems(self, split: str) -> list[Problem]:
        """The problems of ``split``, loaded once and cached."""
        if split not in self._splits:
            self._splits[split] = list(self.load_problems(split))
        return self._splits[split]

    def traces(self, split: str) -> list[Trace]:
        """The traces of ``split``, loaded once and cached."""
        key = f"traces:{split}"
        if key not in self._traces:
            self._traces[key] = list(self.load_traces(split))
        return self._traces[key]

    def _train_on(self) -> str:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "train_on", "problems")

    def train_dataloader(self) -> DataLoader:
        items: list[Any] = self.traces("train") if self._train_on() == "traces" else self.problems("train")
        if not items:
            raise ValueError(f"{type(self).__name__} has no training {self._train_on()}")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            items,  # type: ignore[arg-type]  # a list is a valid map-style dataset
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            collate_fn=_as_list,
            drop_last=len(items) >= self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        problems = self.problems("val")
        module = self.trainer.lightning_module if self.trainer is not None else None
        size = getattr(module, "eval_batch_size", None) or self.batch_size
        return DataLoader(problems, batch_size=size, shuffle=False, collate_fn=_as_list)  # type: ignore[arg-type]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # a batch is a list of Problems (frozen dataclasses of text): nothing to move
