"""retool report: curves as PNG, an escaped trajectory page, evaluation tables, and errors that name the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from retool.cli import main as retool
from retool.report import load_run, plot_curves, write_report


def main(argv: list[str]) -> int:
    return retool(["report", *argv])


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(1)</script> and </pre> oops"
RESPONSE = (
    "Let me compute.\n<code>\n```python\nprint(6 * 7)\n```\n</code>\n<interpreter>\n42\n</interpreter>\n"
    f"{HOSTILE}\n<answer>\\boxed{{42}}</answer>"
)


def write_jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def trajectory(step: int, i: int, reward: float, **extra) -> dict:
    return {
        "step": step,
        "problem_id": f"p{i}",
        "group": i,
        "prompt": "What is 6 * 7?",
        "answer": "42",
        "response": RESPONSE,
        "reward": reward,
        "finish_reason": "eos",
        "tool_calls": 1,
        **extra,
    }


def eval_row(step: int, accuracy: float) -> dict:
    return {
        "step": step,
        "eval/accuracy": accuracy,
        "eval/avg@4": accuracy - 0.05,
        "eval/pass@4": accuracy + 0.25,
        "eval/k": 4,
        "eval/code_ratio": 0.5,
        "eval/code_lines": 3.0,
        "eval/cell_ok": 0.75,
        "eval/last_cell_ok": 0.8,
        "eval/first_cell_pos": 0.2,
        "eval/response_length": 180.0,
        "eval/model_tokens": 150.0,
        "eval/problems": 8,
    }


@pytest.fixture
def rl_run(tmp_path: Path) -> Path:
    """An RL run: 3 steps of metrics (one with a NaN), 2 evaluations, 6 trajectories per step, eval trajectories."""
    run = tmp_path / "grpo"
    run.mkdir()
    metrics = [
        {"step": s, "reward/mean": -1 + 0.4 * s, "reward/correct": 0.2 * s, "tools/calls": 1.0 + s,
         "tools/code_ratio": 0.5, "tools/cell_ok": 0.6, "response/length": 100.0 + s, "train/loss": 0.1}
        for s in (1, 2, 3)
    ]  # fmt: skip
    metrics[1]["tools/cell_ok"] = math.nan
    write_jsonl(run / "metrics.jsonl", metrics)
    write_jsonl(run / "evaluation.jsonl", [eval_row(0, 0.125), eval_row(3, 0.375)])
    write_jsonl(
        run / "trajectories.jsonl", [trajectory(s, i, 1.0 if i % 2 else -1.0) for s in (1, 2, 3) for i in range(6)]
    )
    write_jsonl(run / "eval_trajectories.jsonl", [trajectory(3, i, 1.0, correct=True) for i in range(2)])
    (run / "recipe.yaml").write_text("algorithm:\n  class_path: GRPO\n", encoding="utf-8")
    return run


@pytest.fixture
def sft_run(tmp_path: Path) -> Path:
    """An SFT run: loss only, and evaluations before and after training."""
    run = tmp_path / "sft"
    run.mkdir()
    write_jsonl(run / "metrics.jsonl", [{"step": s, "train/loss": 2.0 / s, "train/lr": 1e-5} for s in range(1, 5)])
    write_jsonl(run / "evaluation.jsonl", [eval_row(0, 0.0625), eval_row(4, 0.25)])
    return run


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


def test_rl_run_writes_figures_page_and_table(rl_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(rl_run)]) == 0
    report = rl_run / "report"
    assert_png(report / "training.png")
    assert_png(report / "evaluation.png")
    page = (report / "trajectories.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; and &lt;/pre&gt; oops" in page
    assert "<script" not in page.lower() and "</pre> oops" not in page
    assert '<span class="cell">&lt;code&gt;\n```python\nprint(6 * 7)\n```\n&lt;/code&gt;</span>' in page
    assert '<span class="interp">&lt;interpreter&gt;\n42\n&lt;/interpreter&gt;</span>' in page
    assert '<span class="answer">&lt;answer&gt;\\boxed{42}&lt;/answer&gt;</span>' in page
    assert '<span class="reward pos">reward +1.00</span>' in page and '<span class="reward neg">' in page
    assert "evaluation trajectories" in page and "algorithm GRPO" in page
    assert page.count('<div class="traj') == 3 * 4 + 2  # 4 of 6 per training step, both eval ones
    out = capsys.readouterr().out
    for text in ("0.125", "0.375", "avg@4", "pass@4", "0.625", "training: 3 steps", "reward -0.600 -> 0.200"):
        assert text in out
    assert "trajectories.html" in out


def test_max_per_step_caps_the_page(rl_run: Path, tmp_path: Path) -> None:
    assert main([str(rl_run), "--max-per-step", "2", "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "trajectories.html").read_text(encoding="utf-8")
    assert page.count('<div class="traj') == 3 * 2 + 2
    assert "(2 of 6 shown)" in page
    assert not (rl_run / "report").exists()


def test_sft_run_plots_loss_and_summary(sft_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sft_run)]) == 0
    assert_png(sft_run / "report" / "training.png")
    assert_png(sft_run / "report" / "evaluation.png")
    assert not (sft_run / "report" / "trajectories.html").exists()  # no trajectories in this run
    out = capsys.readouterr().out
    assert "training: 4 steps (1..4); loss 2.000 -> 0.500" in out


def test_several_runs_print_a_comparison(sft_run: Path, rl_run: Path, tmp_path: Path, capsys) -> None:
    assert main([str(sft_run), str(rl_run), "--out", str(tmp_path / "cmp")]) == 0
    assert_png(tmp_path / "cmp" / "sft" / "evaluation.png")
    assert_png(tmp_path / "cmp" / "grpo" / "evaluation.png")
    out = capsys.readouterr().out
    comparison = out[out.index("held-out evaluations across the runs") :]
    rows = [line.split() for line in comparison.splitlines() if " sft " in line or " grpo " in line]
    # Every evaluation, in the order the runs were given: the stages of a pipeline read top to bottom.
    assert [(r[1], r[3], r[5]) for r in rows] == [
        ("sft", "0", "0.062"),  # before SFT
        ("sft", "4", "0.250"),  # after SFT
        ("grpo", "0", "0.125"),
        ("grpo", "3", "0.375"),  # after RL
    ]


def test_partial_last_line_is_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "killed"
    run.mkdir()
    write_jsonl(
        run / "metrics.jsonl", [{"step": 1, "reward/mean": 0.5}, {"step": 2, "reward/mean": -0.5}], '{"step": 3, "rew'
    )
    odd = {"step": "late", "reward": "n/a", "response": None, "tool_calls": [{}, {}]}  # odd rows never crash it
    write_jsonl(run / "trajectories.jsonl", [trajectory(1, 0, 1.0), odd], "not json\n")
    assert main([str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {run / 'metrics.jsonl'}:3: skipped a malformed line" in err
    assert f"{run / 'trajectories.jsonl'}:3" in err
    page = (run / "report" / "trajectories.html").read_text(encoding="utf-8")
    assert "step late" in page and "reward -" in page and "code cells 2" in page
    assert len(load_run(run).metrics) == 2
    assert_png(run / "report" / "training.png")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str) -> None:
    target = tmp_path / "nope"
    if make == "empty":
        target.mkdir()
    assert main([str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a run directory" in err and "run retool fit first" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: RUN_DIR"),
        (["x", "--bogus"], "unknown option '--bogus'"),
        (["x", "--max-per-step", "0"], "positive"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_library_functions_for_scripts(rl_run: Path, tmp_path: Path) -> None:
    run = load_run(rl_run)
    assert [len(run.metrics), len(run.evaluation), len(run.trajectories), len(run.eval_trajectories)] == [3, 2, 18, 2]
    paths = write_report(rl_run, tmp_path / "r", max_per_step=1)
    assert {p.name for p in paths} == {"training.png", "evaluation.png", "trajectories.html"}
    seeds = {"run A": [(0, 0.1, 0.05), (5, 0.3, 0.1)], "run B": [(0, 0.1), (5, 0.2)], "empty": []}
    assert_png(plot_curves(seeds, tmp_path / "cmp.png", "accuracy over seeds", ylabel="accuracy"))
    assert plot_curves({"nothing": []}, tmp_path / "none.png", "empty") is None
    assert not (tmp_path / "none.png").exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: retool report RUN_DIR")


def test_tables_written_to_a_file_keep_their_width(monkeypatch) -> None:
    # Cluster logs, nohup and CI write to files, where rich would assume 80 columns and cut the headers.
    import io

    from retool.cli._common import FILE_WIDTH, console
    from retool.tables import evaluation_table

    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    made = console(file=out)
    assert not made.is_terminal and made.width == FILE_WIDTH
    made.print(evaluation_table([eval_row(0, 0.25), eval_row(10, 0.5)], "evaluation"))
    text = out.getvalue()
    assert "accuracy" in text and "last cell ok" in text and "…" not in text
    monkeypatch.setenv("COLUMNS", "100")
    assert console(file=io.StringIO()).width == 100  # an explicit width still wins
