"""The dataset contract: a LightningDataModule whose batches are lists of :class:`~retool.Problem` (for RL and
evaluation) or of :class:`~retool.Trace` (for supervised fine-tuning)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, SequentialSampler

from retool.eval_sets import EvalSet, Protocol, protocol_of, resolve
from retool.rows import read_problems
from retool.types import Problem, Trace


def _as_list(batch: list[Any]) -> list[Any]:
    # Problems and traces are not tensors: keep a batch as the plain list of dataclasses.
    return batch


class RankBatches(Sampler[list[int]]):
    """The global batches of ``order``, each cut into ``world`` equal shares; yields this ``rank``'s share.

    Every rank draws the same global order (the same seeded generator), so the ranks' shares of a step are
    disjoint and together are the batch a single process would take: a run on 2 processes trains on the same
    problems at each step as a run on one. Shares are contiguous, so a rank's problems are a slice of the
    global batch, in order.
    """

    def __init__(self, order: Sampler[int], batch_size: int, drop_last: bool, world: int = 1, rank: int = 0) -> None:
        self.batches = BatchSampler(order, batch_size, drop_last)
        self.world = world
        self.rank = rank

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.batches:
            size = -(-len(batch) // self.world)  # a last, short batch is shared as evenly as it can be
            yield batch[self.rank * size : (self.rank + 1) * size]

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader(DataLoader):
    """The training batches, resumable mid-epoch: a Lightning checkpoint keeps where the epoch was.

    Lightning saves the ``state_dict`` of a training loader that has one and gives it back on resume. Here it is
    the shuffling generator as it was when the current epoch began (every epoch's order is drawn from it, so the
    epochs after follow too) and how many of the epoch's batches the trainer had finished; a resumed loader
    draws that epoch again and skips them. Batches finished are counted from ``trainer.global_step`` (one batch
    is one training step), not from the batches handed out, which run ahead of training by Lightning's prefetch.
    """

    def __init__(self, *args: Any, steps_done: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps_done = steps_done if steps_done is not None else (lambda: 0)
        self._epoch_generator: torch.Tensor | None = None
        self._epoch_first_step = 0
        self._resume: dict[str, Any] | None = None

    def __iter__(self):  # type: ignore[no-untyped-def]
        skip = 0
        if self._resume is not None:
            if self.generator is not None:
                self.generator.set_state(self._resume["generator"])
            skip = int(self._resume["batches_done"])
            self._resume = None
        self._epoch_generator = self.generator.get_state() if self.generator is not None else None
        self._epoch_first_step = int(self._steps_done()) - skip
        batches = super().__iter__()
        for _ in range(skip):
            next(batches)
        return batches

    def state_dict(self) -> dict[str, Any]:
        done = int(self._steps_done()) - self._epoch_first_step
        if done >= len(self) and self.generator is not None:
            # The epoch is over: a resumed run starts the next one, whose order is drawn from the generator as it
            # is now (Lightning begins a new epoch after a checkpoint taken at an epoch's last batch).
            return {"generator": self.generator.get_state(), "batches_done": 0}
        return {"generator": self._epoch_generator, "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state.get("generator") is not None or self.generator is None else None


class ProblemDataModule(L.LightningDataModule):
    """Base class of every dataset plugin.

    A subclass implements :meth:`load_problems`, and :meth:`load_traces` if it has worked solutions to
    fine-tune on; this class turns them into shuffled, seeded batches. What the training batches hold is the
    algorithm's choice (its ``train_on`` attribute): problems for RL, traces for SFT. Validation batches are
    always the ``val`` problems, which evaluation rolls out and scores. A training "epoch" is one pass over
    the training items; ``trainer.max_steps`` decides how many batches (steps) a run takes, cycling through
    epochs as needed.

    With several processes (``trainer.devices`` or ``trainer.num_nodes`` > 1), ``batch_size`` is still the
    whole step's: each rank takes an equal, disjoint share of every batch (:class:`RankBatches`), and of the
    held-out problems.

    Evaluation sets (``eval_sets``) replace the ``val`` problems with named sets, each evaluated with its own
    protocol and logged under ``eval/<name>/...`` (see :mod:`retool.eval_sets`); the name ``val`` stands for
    the dataset's own ``val`` problems among them.

    Args:
        batch_size: Problems per RL step (each is rolled out ``group_size`` times by the algorithm), or traces
            per SFT step, over all processes together; it must be a multiple of the number of processes.
        seed: Seed of the shuffling order (and of generated problems, for generators).
        shuffle: Shuffle the training problems each epoch.
        eval_sets: Named evaluation sets: presets (``aime24``, ``aime25``, ``math500``), ``val`` (this dataset's
            own held-out problems), or mappings with a ``name``, a ``path`` to a JSON-lines file and protocol
            options (``n``, ``temperature``, ``top_p``, ``max_new_tokens``, ``greedy``, ``protocol``);
            ``None``: evaluate on the ``val`` problems as one unnamed set.
        eval_protocol: The protocol of the sets that name none: ``greedy`` (one greedy answer each),
            ``paper`` (32 samples at temperature 1.0, top-p 0.7, 16,384 tokens: the ReTool paper's), or a
            mapping of protocol options.
        eval_limit: Evaluate at most this many problems of each set (a quick look; ``None``: all).
    """

    def __init__(
        self,
        batch_size: int = 2,
        seed: int = 0,
        shuffle: bool = True,
        eval_sets: list[str | dict[str, Any]] | None = None,
        eval_protocol: str | dict[str, Any] = "greedy",
        eval_limit: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data batch_size must be >= 1, got {batch_size}")
        if eval_limit is not None and eval_limit < 1:
            raise ValueError(f"data eval_limit must be >= 1 or null, got {eval_limit}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.eval_sets = eval_sets
        self.eval_protocol = eval_protocol
        self.eval_limit = eval_limit
        # Resolved now, so that an unknown set or protocol option is a recipe error before any weights load.
        self.named_sets: list[EvalSet] = resolve(eval_sets, eval_protocol, own="val") if eval_sets is not None else []
        protocol_of(eval_protocol)
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
        """The problems of ``split``, loaded once and cached (``val``: those of the evaluation sets, if named)."""
        if split not in self._splits:
            if split == "val" and self.named_sets:
                self._splits[split] = self._eval_set_problems()
            else:
                self._splits[split] = list(self.load_problems(split))
                if split == "val" and self.eval_limit is not None:
                    self._splits[split] = self._splits[split][: self.eval_limit]
        return self._splits[split]

    def eval_protocols(self) -> dict[str, Protocol]:
        """Each named evaluation set's protocol, by name (empty without ``eval_sets``)."""
        return {s.name: s.protocol for s in self.named_sets}

    def _eval_set_problems(self) -> list[Problem]:
        """The problems of every named set, in order, each tagged with its set (``metadata["eval_set"]``)."""
        problems: list[Problem] = []
        for chosen in self.named_sets:
            limit = min(x for x in (chosen.limit, self.eval_limit, 1 << 62) if x is not None)
            if chosen.path == "":  # the dataset's own val split
                own = list(self.load_problems("val"))[:limit]
            else:
                own = read_problems(
                    chosen.path,
                    owner=f"eval set {chosen.name!r}",
                    options=("path", "prompt_field", "answer_field"),
                    prompt_field=chosen.prompt_field,
                    answer_field=chosen.answer_field,
                    id_field=chosen.id_field,
                    limit=limit,
                )
            if not own:
                raise ValueError(f"eval set {chosen.name!r} has no problems")
            problems += [replace(p, metadata={**p.metadata, "eval_set": chosen.name}) for p in own]
        return problems

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
        world, rank = self._world()
        if self.batch_size % world:
            raise ValueError(
                f"data batch_size ({self.batch_size}) is the whole step's batch and must be a multiple of the "
                f"number of processes ({world}), so that every rank takes an equal share"
            )
        # The DataLoader draws a worker seed from this generator before the sampler draws its order, as it did
        # when it shuffled by itself: one process takes the same batches as before ranks existed.
        generator = torch.Generator().manual_seed(self.seed)
        order = RandomSampler(items, generator=generator) if self.shuffle else SequentialSampler(items)
        batches = RankBatches(order, self.batch_size, drop_last=len(items) >= self.batch_size, world=world, rank=rank)
        return ResumableLoader(
            items,  # type: ignore[arg-type]  # a list is a valid map-style dataset
            batch_sampler=batches,
            generator=generator,
            collate_fn=_as_list,
            steps_done=lambda: self.trainer.global_step if self.trainer is not None else 0,
        )

    def val_dataloader(self) -> DataLoader:
        problems = self.problems("val")
        module = self.trainer.lightning_module if self.trainer is not None else None
        size = getattr(module, "eval_batch_size", None) or self.batch_size
        world, rank = self._world()
        if 0 < len(problems) < world:
            raise ValueError(
                f"{len(problems)} val problems cannot be shared among {world} processes (one each at least)"
            )
        # Each rank evaluates a contiguous share of the problems (evaluation gathers the results in order).
        share = -(-len(problems) // world)
        mine = problems[rank * share : (rank + 1) * share]
        per_rank = max(1, -(-size // world))
        self._val_layout = (rank * share, per_rank)
        return DataLoader(mine, batch_size=per_rank, shuffle=False, collate_fn=_as_list)  # type: ignore[arg-type]

    def val_position(self, batch_idx: int) -> int:
        """Where this rank's validation batch ``batch_idx`` starts among all the ``val`` problems: evaluation
        names (and seeds) its sessions by it, so that several processes sample what one would."""
        start, per_rank = getattr(self, "_val_layout", (0, self.batch_size))
        return start + batch_idx * per_rank

    def _world(self) -> tuple[int, int]:
        """(processes, this one's global rank) of the trainer this module is attached to."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # a batch is a list of Problems (frozen dataclasses of text): nothing to move
