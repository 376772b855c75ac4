"""The paper's outcome reward: +1 if the model's final ``\\boxed{}`` answer equals the ground truth, else -1.

Equivalence is decided by math-verify (``\\frac{1}{2}``, ``0.5`` and ``1/2`` are one answer). Its own time
limits use ``SIGALRM``, which only works in a process's main thread, and a trainer scores rewards from any
thread; so the checks run in worker processes that this module starts and kills when a check overruns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

# extract_boxed_answer is not used here but is imported from here by plugins that reuse this reward's parts.
from retool.answer import extract_boxed_answer, final_boxes  # noqa: F401
from retool.reward import Reward
from retool.types import Problem, RewardOutput, Trajectory

logger = logging.getLogger(__name__)

# Longer "answers" are junk (a run-away generation); parsing them would only burn the time limit.
_MAX_ANSWER_CHARS = 10_000
# More different boxes is an enumeration of guesses, not an answer; the cap also bounds the checks per answer.
_MAX_BOXES = 16
# A check_fn whose error messages hold its inputs makes a new kind of error per input: the log stops there.
_MAX_ERROR_KINDS = 20
_OTHER_ERRORS = "(further kinds)"
# A worker imports math-verify and sympy before it reports ready (0.3 s when idle; far longer under load).
_STARTUP_TIMEOUT_S = 120.0


def _parse(answer: str) -> list:
    from math_verify import parse

    # Wrapping plain text in \boxed{} lets math-verify read bare numbers and LaTeX alike; the timeout is ours.
    for candidate in (f"\\boxed{{{answer}}}", f"${answer}$", answer):
        parsed = parse(candidate, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def check_equivalent(gold: str, prediction: str) -> bool:
    """Whether ``prediction`` is mathematically equivalent to ``gold`` (both plain text or LaTeX).

    Runs without a time limit: :class:`MathAnswerReward` calls it in a worker process that it can kill.
    """
    from math_verify import verify

    gold_parsed, pred_parsed = _parse(gold), _parse(prediction)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def answer_checks(boxes: Sequence[str]) -> tuple[str, ...]:
    """What to compare with the ground truth for a final answer of ``boxes`` (see :class:`MathAnswerReward`).

    Args:
        boxes: The boxed contents of the final answer (:func:`retool.answer.final_boxes`).

    Returns:
        ``()`` when nothing is to be checked (no box, too many boxes, too long: incorrect). For one box, or
        boxes that are all the same text: that one prediction, right if it matches. For several different
        boxes: first all of them as one comma-separated list, then each box alone; the answer is right if the
        list matches, or if every box alone does (see :func:`answer_verdict`).
    """
    distinct = list(dict.fromkeys(boxes))  # a box repeated word for word is the same answer: check it once
    if not distinct or len(distinct) > _MAX_BOXES:
        return ()
    together = ", ".join(distinct)
    if len(together) > _MAX_ANSWER_CHARS:
        return ()
    return (together,) if len(distinct) <= 1 else (together, *distinct)


def answer_verdict(results: Sequence[bool]) -> bool:
    """Whether an answer is right, given the verdicts of its :func:`answer_checks` in order."""
    if not results:
        return False
    # A single check is the whole answer; with several boxes, each box alone is all or nothing, so that a hedge
    # ("5 or 6": one box right, one wrong) fails, and so does the list of both unless the ground truth is a list.
    return results[0] or (len(results) > 1 and all(results[1:]))


# Workers are fresh interpreters: not forked (forking a trainer that runs threads can deadlock the child), and
# not multiprocessing's spawn (it re-imports the parent's main script, e.g. the whole trainer CLI, in each one).
# They load retool's submodules without retool/__init__.py, which imports torch and lightning (3 s, 300 MB each);
# so a check_fn's module must import from retool's submodules (``retool.types``), not from ``retool``.
_WORKER_CODE = """
import importlib.util, json, sys, types
sys.path[:] = json.loads(sys.argv[2])
retool = types.ModuleType("retool")
retool.__path__ = list(importlib.util.find_spec("retool").submodule_search_locations)
sys.modules["retool"] = retool
from multiprocessing.connection import Connection
from retool_plugins.rewards.math_answer import _worker_main
_worker_main(Connection(int(sys.argv[1])))
"""


def _error_kind(error: BaseException) -> str:
    """``"ValueError: the first line of its message"``, cut short: what tells one failure from another."""
    name = type(error).__qualname__
    module = type(error).__module__
    name = name if module == "builtins" else f"{module}.{name}"
    head = str(error).strip().split("\n", 1)[0]
    return f"{name}: {head[:120]}" if head else name


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive ``(check_fn, [(key, gold, prediction), ...])``, send ``(key, ok, error)`` per item.

    ``error`` is ``None``, or the kind of the exception the check raised (the check then counts as failed).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops the workers
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout is disabled" warning is expected
    with contextlib.suppress(Exception):  # warm up (imports, grammar) so the first real check is not charged for it
        check_equivalent("\\frac{1}{2}", "0.5")
    conn.send(("ready", True))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the trainer is gone
            return
        except Exception as error:  # e.g. a check_fn the worker cannot import
            conn.send(("error", repr(error), None))
            continue
        if message is None:
            return
        check_fn, items = message
        for key, gold, prediction in items:
            try:
                ok, failure = bool(check_fn(gold, prediction)), None
            except Exception as error:  # an answer that cannot be checked is wrong; the parent logs why
                ok, failure = False, _error_kind(error)
            conn.send((key, ok, failure))


class _Worker:
    """One checker process and the parent's end of its socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_CODE, str(theirs.fileno()), json.dumps(sys.path)],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self.conn = Connection(ours.detach())
        self.started = 0.0  # when the item it is working on started (parent's clock)

    def wait_ready(self) -> None:
        try:
            ready = self.conn.poll(_STARTUP_TIMEOUT_S) and self.conn.recv()
        except (EOFError, OSError):  # it exited
            ready = None
        if not ready:
            self.kill()
            raise RuntimeError(
                f"a math-verify worker did not start within {_STARTUP_TIMEOUT_S:.0f} s (exit code "
                f"{self.process.returncode}; its error, if any, is printed above); "
                "`python -c 'import retool_plugins.rewards.math_answer'` must work"
            )

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # already gone
            self.conn.send(None)
        with contextlib.suppress(subprocess.TimeoutExpired):  # busy with a check that will not end: killed
            self.process.wait(2)
        self.kill()


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()


class MathAnswerReward(Reward):
    """Scores ``correct`` if the model's final boxed answer equals the problem's answer, else ``incorrect``.

    Reads ``Trajectory.model_text`` only, so a box printed by the interpreter never counts. The answer is:

    - Every box in the last ``<answer>...</answer>`` block; if that block has none, or there is no block,
      every box in the text. A box is ``\\boxed{...}``, ``\\fbox{...}`` (math-verify reads both), or
      ``\\boxed`` before one LaTeX token: ``\\boxed 5`` is 5 (and, as LaTeX reads it, ``\\boxed 42`` is 4).
    - One box, or one box repeated word for word, is compared with the ground truth as it is:
      ``\\boxed{2, 3}`` matches ``2, 3``.
    - Several different boxes are one answer. It is right if the boxes, read as one comma-separated list,
      match the ground truth (``\\boxed{2} and \\boxed{3}`` matches ``2, 3`` and ``\\{3, 2\\}``; math-verify
      compares a set in any order, a tuple such as ``(2, 3)`` in order), or if every box alone matches it
      (``\\boxed{5}``, then ``\\boxed{5.0}``, for 5). So a hedge, two different values for one
      (``\\boxed{5} or \\boxed{6}`` for 5), is incorrect.
    - No box, more than 16 different boxes, or boxes of over 10,000 characters together score ``incorrect``.

    Components: ``correct``, ``has_answer`` (a box was found) and ``timed_out`` (a check of the answer
    overran its limit), each 0 or 1.

    Checks run in ``workers`` processes started on first use and reused; a check that overruns
    ``timeout_s`` scores ``incorrect`` and its process is replaced. Call :meth:`close` to stop them early
    (they also stop at interpreter exit). A check that raises scores ``incorrect`` too, and is logged as a
    warning the first time each kind of error (type and message) occurs.

    Args:
        correct: Reward of an answer equivalent to the ground truth (paper: 1).
        incorrect: Reward of a wrong, missing or unverifiable answer (paper: -1).
        timeout_s: Time limit of one equivalence check, in seconds.
        workers: Checker processes; more score a large batch faster at the cost of one CPU core each.
    """

    # The function the workers call; a subclass may swap it for a module-level ``(gold, prediction) -> bool``
    # (it is sent to the worker processes by reference, so it must be importable there). With several boxes it
    # is called with their comma-separated list and with each box (see answer_checks).
    check_fn: Callable[[str, str], bool] = staticmethod(check_equivalent)

    def __init__(self, correct: float = 1.0, incorrect: float = -1.0, timeout_s: float = 5.0, workers: int = 1) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.correct = correct
        self.incorrect = incorrect
        self.timeout_s = timeout_s
        self.workers = workers
        self._setup()

    def _setup(self) -> None:
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time talks to the pipes
        self._check_errors: dict[str, int] = {}  # kind of error a check_fn raised -> how many checks it failed
        self._finalizer = weakref.finalize(self, _stop_all, self._pool)  # also runs at interpreter exit

    def __getstate__(self) -> dict[str, Any]:
        # Processes, pipes and locks do not pickle (checkpoints save hyperparameters): copies start their own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_pool", "_lock", "_finalizer", "_check_errors")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def close(self) -> None:
        """Stop the worker processes (the next call starts new ones)."""
        with self._lock:
            _stop_all(self._pool)

    def __call__(self, trajectories: Sequence[Trajectory], problems: Sequence[Problem]) -> RewardOutput:
        if len(trajectories) != len(problems):
            raise ValueError(
                f"got {len(trajectories)} trajectories for {len(problems)} problems; pass problems[i] for "
                "trajectories[i] (repeat each problem once per trajectory of its group)"
            )
        answers = [final_boxes(t.model_text) for t in trajectories]
        checks = [[(p.answer, c) for c in answer_checks(a)] for p, a in zip(problems, answers, strict=True)]
        # Identical (gold, prediction) pairs are common within a group: check each pair once.
        pairs = sorted({pair for keys in checks for pair in keys})
        verdicts, timed_out = self._check(pairs)
        correct = [answer_verdict([verdicts.get(pair, False) for pair in keys]) for keys in checks]
        return RewardOutput(
            rewards=[self.correct if ok else self.incorrect for ok in correct],
            components={
                "correct": [float(ok) for ok in correct],
                "has_answer": [float(bool(a)) for a in answers],
                "timed_out": [float(any(pair in timed_out for pair in keys)) for keys in checks],
            },
        )

    def _check(self, pairs: list[tuple[str, str]]) -> tuple[dict[tuple[str, str], bool], set[tuple[str, str]]]:
        """Check ``(gold, prediction)`` pairs across the workers; returns verdicts and the pairs that timed out."""
        verdicts: dict[int, bool] = {}
        timed_out: set[int] = set()
        with self._lock:
            try:
                if pairs and not self._pool:
                    self._pool.extend(_Worker() for _ in range(self.workers))  # start all, then wait: in parallel
                    for worker in self._pool:
                        worker.wait_ready()
                n = len(self._pool)
                # Each worker gets its share at once and answers item by item, in order; so the item it is on
                # started when it answered the previous one, which is what the time limit is measured from.
                queues = [deque(range(i, len(pairs), n)) for i in range(n)]
                for i in range(n):
                    self._send(i, queues[i], pairs)
                while any(queues):
                    busy = [i for i in range(n) if queues[i]]
                    deadline = min(self._pool[i].started for i in busy) + self.timeout_s
                    ready = wait([self._pool[i].conn for i in busy], timeout=max(0.0, deadline - time.monotonic()))
                    for i in busy:
                        worker, queue = self._pool[i], queues[i]
                        if worker.conn in ready:
                            try:
                                index, ok, failure = worker.conn.recv()
                            except (EOFError, OSError):  # it died (crash, out of memory): that check failed
                                verdicts[queue.popleft()] = False
                                self._replace(i, queue, pairs)
                                continue
                            if index == "error":
                                raise RuntimeError(
                                    f"a math-verify worker could not load check_fn ({ok}); it must be a "
                                    "module-level function whose module imports in a fresh process"
                                )
                            if failure is not None:
                                self._log_failure(failure, pairs[queue[0]])
                            verdicts[queue.popleft()] = ok
                            worker.started = time.monotonic()
                        elif time.monotonic() - worker.started >= self.timeout_s and not worker.conn.poll():
                            timed_out.add(queue[0])
                            verdicts[queue.popleft()] = False
                            self._replace(i, queue, pairs)
            except BaseException:
                # Workers may still owe answers to this batch; they must not be read as the next batch's.
                while self._pool:
                    self._pool.pop().kill()
                raise
        return {pairs[i]: ok for i, ok in verdicts.items()}, {pairs[i] for i in timed_out}

    def _log_failure(self, kind: str, pair: tuple[str, str]) -> None:
        """Count a check that raised, and log its kind of error (:func:`_error_kind`) the first time it occurs."""
        name = getattr(self.check_fn, "__qualname__", repr(self.check_fn))
        if kind not in self._check_errors and len(self._check_errors) >= _MAX_ERROR_KINDS:
            if _OTHER_ERRORS not in self._check_errors:
                logger.warning(
                    "check_fn %s has raised %d kinds of error; more kinds are counted but not logged",
                    name,
                    _MAX_ERROR_KINDS,
                )
            kind = _OTHER_ERRORS
        count = self._check_errors[kind] = self._check_errors.get(kind, 0) + 1
        if count == 1 and kind != _OTHER_ERRORS:
            gold, prediction = (text if len(text) <= 80 else text[:77] + "..." for text in pair)
            logger.warning(
                "check_fn %s raised %s (gold %r, prediction %r), so that answer scores incorrect; this kind of "
                "error is logged only once",
                name,
                kind,
                gold,
                prediction,
            )

    def _send(self, i: int, queue: deque[int], pairs: list[tuple[str, str]]) -> None:
        if queue:
            self._pool[i].conn.send((self.check_fn, [(j, *pairs[j]) for j in queue]))
            self._pool[i].started = time.monotonic()

    def _replace(self, i: int, queue: deque[int], pairs: list[tuple[str, str]]) -> None:
        """Kill worker ``i`` (stuck or dead) and hand the rest of its queue to a fresh one."""
        self._pool[i].kill()
        self._pool[i] = _Worker()
        self._pool[i].wait_ready()
        self._send(i, queue, pairs)
