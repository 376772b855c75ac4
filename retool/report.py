"""What a run did, readable after the fact: its files read back, its curves drawn, its trajectories as a page.

``load_run`` reads a run directory written by ``retool fit``; ``write_report`` draws its training and evaluation
curves (``training.png``, ``evaluation.png``) and writes a self-contained page of sampled trajectories
(``trajectories.html``); ``plot_curves`` and ``plot_panels`` let a script compare runs on one figure. The
``retool report`` command (:mod:`retool.cli.report`) is built from these. matplotlib is imported only when a
figure is drawn.
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Points = list[tuple]  # (step, value) or (step, value, spread): the spread is drawn as a band of ± spread

Panel = tuple[str, list[tuple[str, str]]]  # (title, [(metric key, legend label), ...])
# The paper's code metrics: the same names under tools/ (training) and eval/ (evaluation), each in 0-1.
_CODE = {"code_ratio": "code ratio", "cell_ok": "cell pass rate", "last_cell_ok": "last-cell pass rate"}
_CODE["first_cell_pos"] = "first-cell position"
TRAINING_PANELS: list[Panel] = [
    ("reward and accuracy", [("reward/mean", "reward"), ("reward/correct", "accuracy")]),
    ("code use (0-1)", [(f"tools/{key}", label) for key, label in _CODE.items()]),
    ("cells", [("tools/calls", "cells per response"), ("tools/code_lines", "code lines per response")]),
    ("response length (tokens)", [("response/length", "with interpreter"), ("response/model_tokens", "model")]),
    ("critic (PPO)", [("train/value_loss", "value loss"), ("train/explained_variance", "explained variance")]),
    ("advantages and returns", [("train/advantage_std", "advantage std"), ("train/return_mean", "return mean")]),
]
SFT_PANELS: list[Panel] = [("loss", [("train/loss", "loss")]), ("gradient norm", [("train/grad_norm", "grad norm")])]
EVAL_PANELS: list[Panel] = [
    ("code use (0-1)", [(f"eval/{key}", label) for key, label in _CODE.items()]),
    ("code lines per response", [("eval/code_lines", "code lines")]),
    ("response length (tokens)", [("eval/response_length", "with interpreter"), ("eval/model_tokens", "model")]),
]
# A response's parts, highlighted in the page: code cells (tagged, or a bare python fence), interpreter replies,
# the final answer. An unclosed part (the response hit its length budget) runs to the end.
_PARTS = re.compile(
    r"(?P<cell><code>.*?(?:</code>|\Z)|```[ \t]*(?:python|py|python3)[ \t]*\n.*?(?:```|\Z))"
    r"|(?P<interp><interpreter>.*?(?:</interpreter>|\Z))|(?P<answer><answer>.*?(?:</answer>|\Z))",
    re.DOTALL,
)
_ERROR = re.compile(r"Traceback \(most recent call last\)|\b\w+(?:Error|Exception): ")


class ReportError(Exception):
    """A run directory that cannot be read: the message names it and says what to do."""


@dataclass(frozen=True)
class RunRecord:
    """A run directory, read back.

    Args:
        path: The directory.
        name: Its folder's name.
        algorithm: The recipe's ``algorithm.class_path``, when ``recipe.yaml`` is there and readable.
        metrics: The rows of ``metrics.jsonl`` (one per training step).
        evaluation: The rows of ``evaluation.jsonl`` (one per evaluation on held-out problems).
        trajectories: The rows of ``trajectories.jsonl`` (sampled training trajectories).
        eval_trajectories: The rows of ``eval_trajectories.jsonl`` (the evaluations' greedy answers).
    """

    path: Path
    name: str
    algorithm: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    trajectories: list[dict[str, Any]] = field(default_factory=list)
    eval_trajectories: list[dict[str, Any]] = field(default_factory=list)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_jsonl(path: Path, warn: Callable[[str], None] = _warn) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file ([] if it is absent). A malformed line (a run killed mid-write leaves
    a partial last line) is skipped with a warning naming the file and line, never an exception."""
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)  # accepts the NaN literal json.dumps writes
            except json.JSONDecodeError as exc:
                warn(f"{path}:{number}: skipped a malformed line ({exc.msg})")
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                warn(f"{path}:{number}: skipped a line that is not a JSON object")
    return rows


def load_run(run_dir: str | Path, warn: Callable[[str], None] = _warn) -> RunRecord:
    """Read a run directory; each list of the record holds the rows of its ``.jsonl`` file ([] when absent).

    Raises:
        ReportError: the directory does not exist or holds neither metrics.jsonl nor evaluation.jsonl.
    """
    path = Path(run_dir)
    if not path.is_dir() or not any((path / f).is_file() for f in ("metrics.jsonl", "evaluation.jsonl")):
        raise ReportError(
            f"{str(run_dir)!r} is not a run directory (no metrics.jsonl or evaluation.jsonl); run retool fit first"
        )
    files = ("metrics", "evaluation", "trajectories", "eval_trajectories")
    rows = {key: read_jsonl(path / f"{key}.jsonl", warn) for key in files}
    return RunRecord(path=path, name=path.resolve().name, algorithm=_algorithm(path), **rows)


def _algorithm(path: Path) -> str | None:
    """The recipe's ``algorithm.class_path``, if the recipe is there and readable (only shown in the page)."""
    try:
        import yaml

        section = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")).get("algorithm")
        return str(section["class_path"]) if isinstance(section, dict) and "class_path" in section else None
    except Exception:
        return None


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row with an integer step and a finite ``key``, by step (absent or NaN: skipped)."""
    points = ((row.get("step"), _number(row.get(key))) for row in rows)
    return sorted((step, value) for step, value in points if type(step) is int and value is not None)


def _keys(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    """Keys that start with ``prefix`` (e.g. ``eval/avg@``), in first-seen order: the ``@k`` is the run's own k."""
    return list(dict.fromkeys(k for row in rows for k in row if k.startswith(prefix)))


def plot_curves(
    series: dict[str, Points], path: str | Path, title: str, *, ylabel: str = "", xlabel: str = "step"
) -> Path | None:
    """Draw named curves on one axes into a PNG and return its path (None, and no file, when every curve is empty).

    Each curve is a list of ``(step, value)``, or ``(step, mean, spread)`` to draw a band of ± spread around the
    mean (e.g. over seeds), so a script can put several runs on one figure.
    """
    return _draw([("", series)], path, title, xlabel, ylabel)


def plot_panels(
    panels: list[tuple[str, dict[str, Points]]], path: str | Path, title: str, *, xlabel: str = "step"
) -> Path | None:
    """Like :func:`plot_curves`, with one axes per ``(panel title, curves)``; empty panels are left out."""
    return _draw(panels, path, title, xlabel)


def _draw(
    panels: list[tuple[str, dict[str, Points]]], path: str | Path, title: str, xlabel: str = "step", ylabel: str = ""
) -> Path | None:
    """One PNG of panels in two columns; a panel whose curves are all empty is left out (no file if all are)."""
    panels = [(name, {k: v for k, v in curves.items() if v}) for name, curves in panels]
    panels = [(name, curves) for name, curves in panels if curves]  # an empty panel is omitted
    if not panels:
        return None
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:  # a script's or notebook's own backend is left alone
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6 * cols, 3.6 * rows), layout="constrained")
    fig.suptitle(title)
    for i, (name, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, points in curves.items():
            steps, means = [p[0] for p in points], [p[1] for p in points]
            (line,) = ax.plot(steps, means, marker="o", markersize=3, label=label)
            if all(len(p) > 2 for p in points):
                low = [m - p[2] for m, p in zip(means, points)]
                high = [m + p[2] for m, p in zip(means, points)]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(name, fontsize=10)
        if "(0-1)" in name and all(0 <= p[1] <= 1 for points in curves.values() for p in points):  # a share: full scale
            ax.set_ylim(-0.03, 1.03)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _panels(rows: Sequence[dict[str, Any]], spec: list[Panel]) -> list[tuple[str, dict[str, Points]]]:
    return [(name, {label: series(rows, key) for key, label in curves}) for name, curves in spec]


def write_report(
    run_dir: str | Path, out_dir: str | Path | None = None, *, max_per_step: int = 4, run: RunRecord | None = None
) -> list[Path]:
    """Write a run's figures and trajectory page into ``out_dir`` (default ``RUN_DIR/report``); return the paths.

    ``run`` is what :func:`load_run` returned, to skip reading the files again.
    """
    run = run or load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    metrics, evaluation, written = run.metrics, run.evaluation, []
    sft = not series(metrics, "reward/mean") and bool(series(metrics, "train/loss"))
    training = _panels(metrics, SFT_PANELS if sft else TRAINING_PANELS)
    written.append(_draw(training, out / "training.png", f"{run.name}: training"))
    accuracy = {"greedy accuracy": series(evaluation, "eval/accuracy")}
    for key in _keys(evaluation, "eval/avg@") + _keys(evaluation, "eval/pass@"):
        accuracy[key.removeprefix("eval/")] = series(evaluation, key)
    eval_panels = [("accuracy (0-1)", accuracy), *_panels(evaluation, EVAL_PANELS)]
    written.append(_draw(eval_panels, out / "evaluation.png", f"{run.name}: evaluation"))
    if run.trajectories or run.eval_trajectories:
        page = out / "trajectories.html"
        page.write_text(render_html(run, max_per_step), encoding="utf-8")
        written.append(page)
    return [p for p in written if p is not None]


# ---- the trajectory page ----------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:1em;background:#fafafa;color:#222}
.traj{background:#fff;border:1px solid #ddd;border-left:6px solid #c62828;margin:1em 0;padding:.4em 1em}
.traj.pos{border-left-color:#2e7d32}.meta{font-size:13px;color:#555}.label{font-size:12px;color:#777;margin-top:.4em}
.reward{color:#fff;background:#c62828;padding:0 .4em;border-radius:3px}.reward.pos{background:#2e7d32}
pre{white-space:pre-wrap;word-break:break-word;font:13px/1.4 ui-monospace,monospace;margin:.2em 0}
details pre{color:#555}.cell{background:#e8f0fe;color:#0d3c8c;box-decoration-break:clone}
.interp{background:#eee;color:#444;box-decoration-break:clone}.interp.err{background:#fde8e8;color:#8c1d1d}
.answer{background:#fff3c4;font-weight:bold}"""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)


def render_response(text: str) -> str:
    """The response as escaped HTML, with code cells, interpreter replies and the answer in their own spans."""
    out, end = [], 0
    for match in _PARTS.finditer(text):
        out.append(html.escape(text[end : match.start()]))
        kind, part = match.lastgroup, match.group()
        if kind == "interp" and _ERROR.search(part):
            kind = "interp err"
        out.append(f'<span class="{kind}">{html.escape(part)}</span>')
        end = match.end()
    out.append(html.escape(text[end:]))
    return "".join(out)


def _trajectory_html(t: dict[str, Any]) -> str:
    e = html.escape
    reward = _number(t.get("reward"))
    cls = "pos" if reward is not None and reward > 0 else "neg"
    calls = t.get("tool_calls")
    meta = [
        f"problem {e(_text(t.get('problem_id')))}",
        f"group {e(_text(t.get('group')))}",
        f'<span class="reward {cls}">reward {"-" if reward is None else f"{reward:+.2f}"}</span>',
        f"finish {e(_text(t.get('finish_reason')))}",
        f"code cells {e(_text(len(calls) if isinstance(calls, list) else calls))}",
    ]
    if "correct" in t:
        meta.append("correct" if t["correct"] is True else "wrong")
    return (
        f'<div class="traj {cls}"><div class="meta">{" · ".join(meta)}</div>'
        f'<details><summary class="label">prompt</summary><pre>{e(_text(t.get("prompt")))}</pre></details>'
        f'<div class="label">gold answer: <b>{e(_text(t.get("answer")))}</b></div>'
        f'<div class="label">response</div><pre class="response">{render_response(_text(t.get("response")))}</pre>'
        "</div>"
    )


def _section(title: str, trajectories: Sequence[dict[str, Any]], max_per_step: int) -> str:
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for t in trajectories:
        by_step.setdefault(t.get("step"), []).append(t)
    parts = [f"<h2>{html.escape(title)}</h2>"]
    for step in sorted(by_step, key=lambda s: (not isinstance(s, int), s if isinstance(s, int) else str(s))):
        group = by_step[step]
        shown = f"{min(len(group), max_per_step)} of {len(group)}"
        parts.append(f"<h3>step {html.escape(_text(step))} <small>({shown} shown)</small></h3>")
        parts.extend(_trajectory_html(t) for t in group[:max_per_step])
    return "\n".join(parts)


def render_html(run: RunRecord, max_per_step: int = 4) -> str:
    """A self-contained page (inline CSS, no script) of at most ``max_per_step`` trajectories per step. All model
    text is escaped: a response is untrusted and may contain any markup."""
    name = html.escape(run.name)
    algorithm = f" · algorithm {html.escape(run.algorithm)}" if run.algorithm else ""
    body = [f"<h1>{name}</h1><p>{html.escape(str(run.path))}{algorithm}</p>"]
    if run.trajectories:
        body.append(_section("training trajectories", run.trajectories, max_per_step))
    if run.eval_trajectories:
        body.append(_section("evaluation trajectories", run.eval_trajectories, max_per_step))
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>retool report: {name}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
