"""Plugins for the multi-process tests, loaded by the ``retool fit`` processes they start (``RETOOL_PLUGINS``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from retool import Problem, ProblemDataModule, Reward, RewardOutput, Trace, Trajectory


class ParityReward(Reward):
    """+1 when the first token the model wrote has an even id, else -1: a reward a random tiny model earns about
    half the time, so most groups have signal and some have none."""

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        rewards = [1.0 if t.token_ids[t.prompt_len] % 2 == 0 else -1.0 for t in trajectories]
        return RewardOutput(rewards=rewards, components={"correct": [float(r > 0) for r in rewards]})


class HalfSilentReward(ParityReward):
    """:class:`ParityReward` on problems ``p0``, ``p1``, ``p4``, ``p5``, ...; -1 for every trajectory of the others.

    With :class:`CountedProblems` unshuffled, batches of 4 and 2 processes, the second rank's problems are all
    of the second kind: its whole share has zero advantage at every step while the first rank's has signal.
    """

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        parity = super().__call__(trajectories, problems).rewards
        rewards = [r if int(p.id[1:]) % 4 < 2 else -1.0 for r, p in zip(parity, problems)]
        return RewardOutput(rewards=rewards, components={"correct": [float(r > 0) for r in rewards]})


class CountedProblems(ProblemDataModule):
    """Problems ``p0`` ... ``p15`` (train) and ``v0`` ... ``v3`` (val), each asking for its number doubled."""

    def load_problems(self, split: str) -> list[Problem]:
        prefix, count = ("p", 16) if split == "train" else ("v", 4)
        return [Problem(id=f"{prefix}{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(count)]

    def load_traces(self, split: str) -> list[Trace]:
        return [
            Trace(problem=p, response=f"{p.prompt[8:-1]} is {p.answer}: \\boxed{{{p.answer}}}")
            for p in self.problems(split)
        ]


class SkewedProblems(CountedProblems):
    """:class:`CountedProblems` whose problems ``p2``, ``p3``, ``p6``, ``p7``, ... have prompts several times longer:
    unshuffled, in batches of 4 on 2 processes, the second rank's share of every step is the long one."""

    def load_problems(self, split: str) -> list[Problem]:
        padding = "Take care, and think it over before you answer. " * 12
        return [
            Problem(id=p.id, prompt=padding + p.prompt, answer=p.answer) if int(p.id[1:]) % 4 >= 2 else p
            for p in super().load_problems(split)
        ]


class DtypeProbe(L.Callback):
    """Writes ``dtypes.json`` in the run directory (rank 0): the dtype the first decoder layer's first linear layer
    computes in during training and the dtype of its weight in that pass; at the end, the dtypes of the policy's
    parameters as each process keeps them and of the optimizer's state (looked up inside a wrapping optimizer
    such as DeepSpeed's)."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.compute: set[str] = set()
        self.gathered: set[str] = set()
        layer = next(m for m in module.model.modules() if type(m).__name__.endswith("DecoderLayer"))
        linear = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))

        def record(layer: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if torch.is_grad_enabled():  # a training pass, not a rollout's
                self.compute.add(str(output.dtype))
                self.gathered.add(str(layer.weight.dtype))  # the weight as the pass used it (gathered, if sharded)

        linear.register_forward_hook(record)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        optimizer: Any = trainer.optimizers[0]
        while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        state = {str(v.dtype) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()}
        found = {
            "compute": sorted(self.compute),
            "gathered": sorted(self.gathered),
            "parameters": sorted({str(p.dtype) for p in module.model.parameters()}),
            "optimizer_state": sorted(state),
        }
        if trainer.global_rank == 0:
            (Path(trainer.default_root_dir) / "dtypes.json").write_text(json.dumps(found), encoding="utf-8")
