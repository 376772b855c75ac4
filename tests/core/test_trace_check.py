"""``retool.traces``: format, execution and answer checks of cold-start traces, on the real LocalSandbox."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from retool._async import run_sync
from retool.cli import main as retool
from retool.rollout.format import ReToolFormat
from retool.traces import TraceVerdict, check_traces
from retool.types import Problem, Trace
from retool_plugins.datasets.trace_file import TraceFile
from retool_plugins.executors.local import LocalSandbox
from retool_plugins.rewards.math_answer import MathAnswerReward

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "retool_sft_sample.jsonl"
FMT = ReToolFormat()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[LocalSandbox]:
    executor = LocalSandbox()
    yield executor
    run_sync(executor.aclose())


@pytest.fixture(scope="module")
def reward() -> Iterator[MathAnswerReward]:
    scorer = MathAnswerReward()
    yield scorer
    scorer.close()


def main(argv: list[str]) -> int:
    return retool(["traces", *argv])


def cell(code: str) -> str:
    return f"<code>\n```python\n{code}\n```\n</code>"


def block(text: str) -> str:
    return f"\n<interpreter>\n{text}\n</interpreter>\n"


def answer(value: str) -> str:
    return f"\nSo the answer is {value}.\n<answer>\\boxed{{{value}}}</answer>"


def trace(response: str, gold: str = "42") -> Trace:
    return Trace(problem=Problem(id="p", prompt="What is 6 * 7?", answer=gold), response=response)


def check(sandbox: LocalSandbox, reward: MathAnswerReward | None, *responses: str) -> list[TraceVerdict]:
    return check_traces([trace(r) for r in responses], FMT, sandbox, reward)


CORRECT = "Let me compute it.\n" + cell("x = 6 * 7\nprint(x)") + block("42") + answer("42")


def test_a_correct_trace_is_kept(sandbox: LocalSandbox, reward: MathAnswerReward) -> None:
    two_cells = (
        cell("x = 6")
        + block("(no output: use print() to show a value)")
        + "Now use x from the first cell.\n"
        + cell("print(x * 7)")
        + block("42")
        + answer("42")
    )
    (one, two) = check(sandbox, reward, CORRECT, two_cells)
    assert one == TraceVerdict(0, True, "ok", "1 cell ran and matched; answer verified", "p")
    assert two.kept and two.detail.startswith("2 cells ran and matched"), two


def test_a_wrong_final_answer_is_dropped(sandbox: LocalSandbox, reward: MathAnswerReward) -> None:
    response = cell("print(6 * 7)") + block("42") + "\nAdding 1 by mistake: 43." + "\n<answer>\\boxed{43}</answer>"
    (verdict,) = check(sandbox, reward, response)
    assert (verdict.kept, verdict.reason) == (False, "wrong_answer")
    assert "'43' is not the gold answer '42'" in verdict.detail


def test_a_cell_output_that_differs_from_its_block_is_dropped(sandbox: LocalSandbox, reward: MathAnswerReward) -> None:
    response = cell("print(6 * 7)") + block("41") + answer("42")
    (verdict,) = check(sandbox, reward, response)
    assert verdict.reason == "output_mismatch" and not verdict.kept
    assert verdict.detail == "cell 1 printed '42' but its interpreter block says '41'"


def test_format_errors_are_dropped_before_anything_runs(sandbox: LocalSandbox) -> None:
    unclosed = "<code>\n```python\nprint(6 * 7)\n```\n" + block("42") + answer("42")
    no_fence = "<code>\nprint(6 * 7)\n</code>" + block("42") + answer("42")
    orphan_block = "I know it." + block("42") + answer("42")
    no_block = cell("print(6 * 7)") + "\nIt prints 42." + answer("42")
    text_in_between = cell("print(6 * 7)") + "\nrunning it now" + block("42") + answer("42")
    two_answers = "<answer>\\boxed{41}</answer>\n" + cell("print(6 * 7)") + block("42") + answer("42")
    verdicts = check(sandbox, None, unclosed, no_fence, orphan_block, no_block, text_in_between, two_answers)
    assert [v.reason for v in verdicts] == ["format"] * 6
    details = [v.detail for v in verdicts]
    assert details[0] == "cell 1 is not closed: its <code> has no </code>"
    assert "no closed ```python fence" in details[1]
    assert details[2] == "interpreter block 1 has no closed code cell before it"
    assert details[3] == "cell 1 has no interpreter block after it"
    assert "followed by text before its interpreter block ('running it now')" in details[4]
    assert details[5].startswith("2 <answer> blocks")


def test_a_missing_answer_is_dropped(sandbox: LocalSandbox) -> None:
    no_answer = cell("print(6 * 7)") + block("42") + "\nThe answer is 42."
    no_box = cell("print(6 * 7)") + block("42") + "\n<answer>42</answer>"
    verdicts = check(sandbox, None, no_answer, no_box)
    assert [(v.kept, v.reason) for v in verdicts] == [(False, "no_answer")] * 2
    assert "\\boxed" in verdicts[1].detail


def test_an_error_shown_in_its_block_is_kept_and_an_unshown_one_is_not(
    sandbox: LocalSandbox, reward: MathAnswerReward
) -> None:
    traceback = (
        'Traceback (most recent call last):\n  File "<string>", line 2, in <module>\n'
        "NameError: name 'y' is not defined"
    )
    recovers = cell("x = 6 * 7\nprint(y)") + block(traceback) + "\nA typo; x is set.\n" + cell("print(x)")
    recovers += block("42") + answer("42")
    hides_it = cell("print(y)") + block("42") + answer("42")
    other_error = cell("print(y)") + block("ZeroDivisionError: division by zero") + answer("42")
    verdicts = check(sandbox, reward, recovers, hides_it, other_error)
    assert verdicts[0].kept, verdicts[0]
    assert verdicts[1].reason == "cell_failed"
    assert verdicts[1].detail == (
        "cell 1 failed with \"NameError: name 'y' is not defined\", but its interpreter block shows no error: '42'"
    )
    assert verdicts[2].reason == "output_mismatch"


def test_a_timeout_matches_a_block_that_reports_one() -> None:
    executor = LocalSandbox(timeout_s=0.5)
    try:
        slow = cell("import time\ntime.sleep(30)")
        shown = slow + block("Execution timed out after 10 seconds") + answer("42")
        hidden = slow + block("42") + answer("42")
        verdicts = check_traces([trace(shown), trace(hidden)], FMT, executor)
    finally:
        run_sync(executor.aclose())
    assert [v.reason for v in verdicts] == ["ok", "cell_failed"], verdicts
    assert "TimeoutError" in verdicts[1].detail


def test_outputs_compare_stripped_and_cut_output_leniently(sandbox: LocalSandbox, reward: MathAnswerReward) -> None:
    spaced = cell("print('  42  ')") + "\n<interpreter>\n\n   42\n\n</interpreter>\n" + answer("42")
    cut = cell("for i in range(100):\n    print(i)") + block("0\n1\n...[280 chars cut]...\n98\n99") + answer("42")
    wrong_cut = cell("for i in range(100):\n    print(i)") + block("0\n1\n...\n97") + answer("42")
    verdicts = check(sandbox, reward, spaced, cut, wrong_cut)
    assert [v.reason for v in verdicts] == ["ok", "ok", "output_mismatch"], verdicts


def test_gold_answers_only_when_the_problem_has_one(sandbox: LocalSandbox, reward: MathAnswerReward) -> None:
    traces = TraceFile(str(FIXTURE), layout="retool-sft").load_traces("train")
    wrong_arithmetic = traces[4]  # 391 + 45 = 426 in the text; the truth is 436
    verdicts = check_traces([wrong_arithmetic], FMT, sandbox, reward)
    assert verdicts[0].kept and "answer not checked: its answer was taken from the trace itself" in verdicts[0].detail
    gold = dataclasses.replace(wrong_arithmetic.problem, answer="436", metadata={})
    verdicts = check_traces([dataclasses.replace(wrong_arithmetic, problem=gold, metadata={})], FMT, sandbox, reward)
    assert (verdicts[0].reason, verdicts[0].kept) == ("wrong_answer", False)
    (no_gold,) = check_traces([trace(CORRECT, gold="")], FMT, sandbox, reward)
    assert no_gold.kept and "answer not checked: the problem has no answer" in no_gold.detail


# ---- retool traces check ------------------------------------------------------------------------------------


def test_main_writes_the_kept_rows_and_prints_the_drop_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "kept.jsonl"
    code = main(["check", str(FIXTURE), "--executor", "LocalSandbox", "--layout", "retool-sft", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    lines = FIXTURE.read_text().splitlines()
    kept_rows = [json.loads(lines[i]) for i in (0, 1, 2, 4)]  # rows 4, 6 and 7 fail
    assert [json.loads(line) for line in out.read_text().splitlines()] == kept_rows
    for expected in (
        "total",
        "kept",
        "dropped: output_mismatch",
        "row 4 (retool_sft_sample-4): cell 1 printed '2'",
        "dropped: format",
        "row 6 (retool_sft_sample-6): cell 1 is not closed",
        "dropped: no_answer",
        "answer not checked for 4 of the kept traces: no reward given",
        f"wrote 4 kept rows to {out}",
    ):
        assert expected in printed, (expected, printed)


def test_main_default_out_is_next_to_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "mine.jsonl"
    source.write_text(json.dumps({"prompt": "What is 6 * 7?", "response": CORRECT, "answer": "42"}) + "\n")
    assert main(["check", str(source), "--executor", "LocalSandbox", "--reward", "MathAnswerReward"]) == 0
    assert json.loads((tmp_path / "mine.kept.jsonl").read_text())["answer"] == "42"
    assert "answer not checked" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--executor", "LocalSandbx"], "unknown executor 'LocalSandbx'; did you mean 'LocalSandbox'?"),
        (["--executor", "LocalSandbox", "--reward", "Nope"], "unknown reward 'Nope'"),
        (["--executor", "LocalSandbox", "--layout", "sharegpt"], "layout must be one of"),
        (["--executor", "LocalSandbox", "--limit", "x"], "--limit takes a whole number"),
        (["--layout", "fields"], "--executor NAME is required"),
    ],
)
def test_main_errors_are_one_line_and_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(FIXTURE), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_main_missing_file_and_unknown_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(tmp_path / "none.jsonl"), "--executor", "LocalSandbox"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["verify", "x"]) == 2
    assert "unknown traces command 'verify'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "usage: retool traces check FILE" in capsys.readouterr().out
