"""The dataset contract: a LightningDataModule whose batches are lists of :class:`~retool.Problem`."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from retool.types import Problem


def _as_list(batch: list[Problem]) -> list[Problem]:
    # Problems are not tensors: keep a batch as the plain list of dataclasses.
    return batch


class ProblemDataModule(L.LightningDataModule):
    """Base class of every dataset plugin.

    A subclass implements :meth:`load_problems`; this class turns its problems into shuffled, seeded
    batches. A training "epoch" is one pass over the training problems; ``trainer.max_steps`` decides how
    many batches (RL steps) a run takes, cycling through epochs as needed.

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

    @abstractmethod
    def load_problems(self, split: str) -> Sequence[Problem]:
        """Return the problems of ``split`` (``"train"`` or ``"val"``); an empty sequence if there are none."""

    def problems(self, split: str) -> list[Problem]:
        """The problems of ``split``, loaded once and cached."""
        if split not in self._splits:
            self._splits[split] = list(self.load_problems(split))
        return self._splits[split]

    def train_dataloader(self) -> DataLoader:
        problems = self.problems("train")
        if not problems:
            raise ValueError(f"{type(self).__name__} has no training problems")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            problems,  # type: ignore[arg-type]  # a list is a valid map-style dataset
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            collate_fn=_as_list,
            drop_last=len(problems) >= self.batch_size,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # a batch is a list of Problems (frozen dataclasses of text): nothing to move
