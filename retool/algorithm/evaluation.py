"""Evaluation on held-out problems: a greedy pass (and, if asked, k sampled ones) through the training rollout.

A mixin of :class:`~retool.algorithm.Algorithm`: the Lightning validation hooks of every algorithm, so that RL
and SFT runs are measured the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from retool import distributed
from retool.eval_sets import Protocol, pass_at_k
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
        self._eval = {"problems": [], "stats": [], "samples": []}
        # A sharded policy is gathered once for the whole evaluation: ranks may hold different numbers of batches.
        self._decoding = contextlib.ExitStack()
        self._decoding.enter_context(self.full_weights())

    def validation_step(self, problems: list[Problem], batch_idx: int) -> None:
        """Answer held-out problems as their evaluation set's protocol says, and score them.

        Without named sets (the data's ``eval_sets``): once greedily, and ``eval_samples`` times by sampling at
        the rollout's temperature. The rollout is the training one (same format, budgets, executor), so
        evaluation measures the policy as RL sees it. Accuracy is the reward's ``correct`` component where it
        has one, else ``reward > 0``.
        """
        if self.rollout is None or self.reward is None:
            raise RuntimeError(f"evaluation needs a rollout and a reward section in the recipe ({type(self).__name__})")
        if not getattr(self, "_eval", None):
            self.on_validation_epoch_start()
        protocols = self._eval_protocols()
        first = self._val_position(batch_idx, len(problems))
        start = 0
        while start < len(problems):  # a batch may span two sets (they are laid end to end): one run per set
            name = problems[start].metadata.get("eval_set") if protocols else None
            end = start + 1
            while end < len(problems) and (problems[end].metadata.get("eval_set") if protocols else None) == name:
                end += 1
            protocol = protocols.get(name) if name is not None else None
            self._evaluate(problems[start:end], first + start, name, protocol)
            start = end

    def _evaluate(self, problems: list[Problem], first: int, name: str | None, protocol: Protocol | None) -> None:
        assert self.rollout is not None and self.reward is not None
        # Sessions (and sampling seeds) are named by the problem's place among all the val problems, not by the
        # rank or the batch: several processes sample what one would.
        prefix = f"e0s{self.global_step}"
        if protocol is None:  # the unnamed val set: greedy, plus the algorithm's eval_samples at the recipe's sampling
            protocol = Protocol(greedy=True, n=self.eval_samples, temperature=self.rollout.temperature)
            top_p = None
        else:
            top_p = protocol.top_p
        records = [{"set": name, "correct": None, "sampled": None} for _ in problems]
        rows: list[tuple[Problem, Any, float, bool]] = []
        if protocol.greedy:
            with self.rollout.sampling(0.0, max_new_tokens=protocol.max_new_tokens):
                greedy = self.rollout.rollout(problems, 1, self.executor, f"{prefix}g", first_index=first)
            scores = self.reward(greedy.trajectories, problems)
            correct = correct_answers(scores)
            for record, ok in zip(records, correct):
                record["correct"] = ok
            self._eval["stats"] += [(name, TrajectoryStats.of(t)) for t in greedy.trajectories]
            rows = list(zip(problems, greedy.trajectories, scores.rewards, correct))
        k = protocol.n
        if k:
            with self.rollout.sampling(protocol.temperature, top_p, protocol.max_new_tokens):
                sampled = self.rollout.rollout(problems, k, self.executor, f"{prefix}k", first_index=first)
            repeated = [p for p in problems for _ in range(k)]
            scores = self.reward(sampled.trajectories, repeated)
            flags = correct_answers(scores)
            for i, record in enumerate(records):
                record["sampled"] = flags[i * k : (i + 1) * k]
            if not protocol.greedy:  # the samples are the set's answers: their code metrics and first answers
                self._eval["stats"] += [(name, TrajectoryStats.of(t)) for t in sampled.trajectories]
                firsts = range(0, len(problems) * k, k)
                rows = [(p, sampled.trajectories[j], scores.rewards[j], flags[j]) for p, j in zip(problems, firsts)]
        self._eval["problems"] += records
        for problem, trajectory, reward, ok in rows:
            self._eval["samples"].append(
                {
                    "step": int(self.global_step),
                    **({"eval_set": name} if name is not None else {}),
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

    def _eval_protocols(self) -> dict[str, Protocol]:
        trainer = getattr(self, "_trainer", None)
        protocols = getattr(getattr(trainer, "datamodule", None), "eval_protocols", None)
        return dict(protocols()) if protocols is not None else {}

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
        gathered = {key: distributed.gather(local.get(key, [])) for key in ("problems", "stats", "samples")}
        records = gathered["problems"]
        if not records:
            self._eval = {}
            return
        names = list(dict.fromkeys(r["set"] for r in records))
        if names == [None]:
            metrics = set_metrics(records, [s for _, s in gathered["stats"]], "eval")
        else:
            metrics = {}
            headline = []
            for name in names:
                mine = [r for r in records if r["set"] == name]
                numbers = set_metrics(mine, [s for n, s in gathered["stats"] if n == name], f"eval/{name}")
                metrics.update(numbers)
                headline.append(numbers[f"eval/{name}/{headline_metric(mine)}"])
            # One number for the console and the report: the mean of each set's headline number.
            metrics["eval/accuracy"] = mean(headline)
            metrics["eval/problems"] = float(len(records))
        # Every rank holds the same gathered numbers: syncing averages equal values (and tells Lightning so).
        self.log_dict(
            metrics, on_step=False, on_epoch=True, batch_size=len(records), sync_dist=distributed.world_size() > 1
        )
        self.last_evaluation = EvalRecord(step=int(self.global_step), metrics=metrics, samples=gathered["samples"])
        self._eval = {}


def headline_metric(records: Sequence[dict[str, Any]]) -> str:
    """A set's main number: ``avg@n`` where it was sampled (the paper's accuracy), else greedy ``accuracy``."""
    sampled = next((r["sampled"] for r in records if r["sampled"] is not None), None)
    return f"avg@{len(sampled)}" if sampled else "accuracy"


def set_metrics(records: Sequence[dict[str, Any]], stats: Sequence[TrajectoryStats], prefix: str) -> dict[str, float]:
    """The metrics of one evaluation set under ``prefix``: its greedy accuracy and/or ``avg@n`` and ``pass@k``,
    and the paper's code metrics of its answers (the greedy ones, else the samples)."""
    paper = summarize(stats)
    metrics: dict[str, float] = {}
    greedy = [r["correct"] for r in records if r["correct"] is not None]
    if greedy:
        metrics[f"{prefix}/accuracy"] = mean([float(c) for c in greedy])
    metrics[f"{prefix}/problems"] = float(len(records))
    metrics.update(
        {
            f"{prefix}/code_ratio": paper["tools/code_ratio"],
            f"{prefix}/calls": paper["tools/calls"],
            f"{prefix}/code_lines": paper["tools/code_lines"],
            f"{prefix}/cell_ok": paper["tools/cell_ok"],
            f"{prefix}/last_cell_ok": paper["tools/last_cell_ok"],
            f"{prefix}/first_cell_pos": paper["tools/first_cell_pos"],
            f"{prefix}/response_length": paper["response/length"],
            f"{prefix}/model_tokens": paper["response/model_tokens"],
        }
    )
    rows = [r["sampled"] for r in records if r["sampled"]]
    if rows:
        k = len(rows[0])
        metrics[f"{prefix}/avg@{k}"] = mean([float(sum(r)) / k for r in rows])
        metrics[f"{prefix}/pass@{k}"] = mean([float(any(r)) for r in rows])
        size = 2
        while size < k:  # the unbiased estimate at smaller k, from the same samples
            metrics[f"{prefix}/pass@{size}"] = mean([pass_at_k(k, sum(r), size) for r in rows])
            size *= 2
        metrics[f"{prefix}/k"] = float(k)
    return metrics


def correct_answers(scores: RewardOutput) -> list[bool]:
    """Per trajectory, whether its answer was right: the reward's ``correct`` component, else reward > 0."""
    if "correct" in scores.components:
        return [value > 0 for value in scores.components["correct"]]
    return [value > 0 for value in scores.rewards]


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
