"""Evaluation on held-out problems: a greedy pass (and, if asked, k sampled ones) through the training rollout.

A mixin of :class:`~retool.algorithm.Algorithm`: the Lightning validation hooks of every algorithm, so that RL
and SFT runs are measured the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from retool import distributed
from retool.metrics import TrajectoryStats, summarize
from retool.types import EvalRecord, Problem, RewardOutput

if TYPE_CHECKING:
    from retool.executor import Executor
    from retool.reward import Reward
    from retool.rollout.backend import RolloutBackend


class Evaluation:
    """Lightning's validation hooks: roll out the ``val`` problems, score them, log ``eval/*`` metrics.

    The host class provides ``rollout``, ``reward``, ``executor``, ``eval_samples`` and LightningModule's
    ``global_step``, ``global_rank`` and ``log_dict``, and ``full_weights`` (see
    :meth:`~retool.algorithm.Algorithm.full_weights`); the result of the last evaluation is kept in
    ``last_evaluation`` for the console and the run directory.
    """

    rollout: RolloutBackend | None
    reward: Reward | None
    executor: Executor | None
    eval_samples: int
    last_evaluation: EvalRecord | None
    global_step: int
    global_rank: int
    log_dict: Any
    full_weights: Any
    _eval: dict[str, list[Any]]

    def on_validation_epoch_start(self) -> None:
        self._eval = {"correct": [], "sampled": [], "stats": [], "samples": []}
        # A sharded policy is gathered once for the whole evaluation: ranks may hold different numbers of batches.
        self._decoding = contextlib.ExitStack()
        self._decoding.enter_context(self.full_weights())

    def validation_step(self, problems: list[Problem], batch_idx: int) -> None:
        """Roll out held-out problems once greedily (and ``eval_samples`` times by sampling) and score them.

        The rollout is the training one (same format, budgets, executor), so evaluation measures the policy
        as RL sees it. Accuracy is the reward's ``correct`` component where it has one, else ``reward > 0``.
        """
        if self.rollout is None or self.reward is None:
            raise RuntimeError(f"evaluation needs a rollout and a reward section in the recipe ({type(self).__name__})")
        if not getattr(self, "_eval", None):
            self.on_validation_epoch_start()
        # Sessions (and sampling seeds) are named by the problem's place among all the val problems, not by the
        # rank or the batch: several processes sample what one would.
        prefix = f"e0s{self.global_step}"
        first = self._val_position(batch_idx, len(problems))
        with self.rollout.sampling(0.0):
            greedy = self.rollout.rollout(problems, 1, self.executor, session_prefix=f"{prefix}g", first_index=first)
        scores = self.reward(greedy.trajectories, problems)
        correct = correct_answers(scores)
        self._eval["correct"] += correct
        self._eval["stats"] += [TrajectoryStats.of(t) for t in greedy.trajectories]
        for problem, trajectory, reward, ok in zip(problems, greedy.trajectories, scores.rewards, correct):
            self._eval["samples"].append(
                {
                    "step": int(self.global_step),
                    "problem_id": problem.id,
                    "prompt": problem.prompt,
                    "answer": problem.answer,
                    "response": trajectory.response_text,
                    "reward": reward,
                    "correct": ok,
                    "finish_reason": trajectory.finish_reason,
                    "tool_calls": len(trajectory.tool_calls),
                }
            )
        k = self.eval_samples
        if k:
            sampled = self.rollout.rollout(problems, k, self.executor, session_prefix=f"{prefix}k", first_index=first)
            flags = correct_answers(self.reward(sampled.trajectories, [p for p in problems for _ in range(k)]))
            self._eval["sampled"] += [flags[i * k : (i + 1) * k] for i in range(len(problems))]

    def _val_position(self, batch_idx: int, size: int) -> int:
        trainer = getattr(self, "_trainer", None)
        position = getattr(getattr(trainer, "datamodule", None), "val_position", None)
        return int(position(batch_idx)) if position is not None else batch_idx * size

    def on_validation_epoch_end(self) -> None:
        decoding = getattr(self, "_decoding", None)
        if decoding is not None:
            decoding.close()
            self._decoding = None
        local = getattr(self, "_eval", None) or {}
        # Each rank evaluated a contiguous share of the problems: gathered in rank order, they are in the
        # problems' order, and every rank computes the numbers one process would.
        gathered = {key: distributed.gather(local.get(key, [])) for key in ("correct", "sampled", "stats", "samples")}
        self._eval = gathered
        correct = gathered["correct"]
        if not correct:
            return
        paper = summarize(gathered["stats"])
        metrics: dict[str, float] = {
            "eval/accuracy": mean([float(c) for c in correct]),
            "eval/problems": float(len(correct)),
            "eval/code_ratio": paper["tools/code_ratio"],
            "eval/calls": paper["tools/calls"],
            "eval/code_lines": paper["tools/code_lines"],
            "eval/cell_ok": paper["tools/cell_ok"],
            "eval/last_cell_ok": paper["tools/last_cell_ok"],
            "eval/first_cell_pos": paper["tools/first_cell_pos"],
            "eval/response_length": paper["response/length"],
            "eval/model_tokens": paper["response/model_tokens"],
        }
        if self._eval["sampled"]:
            k = self.eval_samples
            rows = self._eval["sampled"]
            metrics[f"eval/avg@{k}"] = mean([float(sum(r)) / k for r in rows])
            metrics[f"eval/pass@{k}"] = mean([float(any(r)) for r in rows])
            metrics["eval/k"] = float(k)
        # Every rank holds the same gathered numbers: syncing averages equal values (and tells Lightning so).
        self.log_dict(
            metrics, on_step=False, on_epoch=True, batch_size=len(correct), sync_dist=distributed.world_size() > 1
        )
        self.last_evaluation = EvalRecord(step=int(self.global_step), metrics=metrics, samples=self._eval["samples"])
        self._eval = {}


def correct_answers(scores: RewardOutput) -> list[bool]:
    """Per trajectory, whether its answer was right: the reward's ``correct`` component, else reward > 0."""
    if "correct" in scores.components:
        return [value > 0 for value in scores.components["correct"]]
    return [value > 0 for value in scores.rewards]


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
