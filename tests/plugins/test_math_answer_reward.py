from __future__ import annotations

import pickle
import threading
import time

import pytest

from retool.types import Problem, Trajectory
from retool_plugins.rewards.math_answer import MathAnswerReward, extract_boxed_answer


def traj(model_text: str, response_text: str | None = None) -> Trajectory:
    return Trajectory(
        problem_id="p",
        group=0,
        token_ids=[1, 2, 3],
        loss_mask=[0, 1, 1],
        prompt_len=1,
        prompt_text="prompt",
        response_text=model_text if response_text is None else response_text,
        model_text=model_text,
    )


def problem(answer: str) -> Problem:
    return Problem(id="p", prompt="q", answer=answer)


def slow_check(gold: str, prediction: str) -> bool:
    """A checker that hangs on one input, standing in for a sympy expression that never finishes.

    Other inputs are compared as text, so that a loaded machine cannot push them past the time limit.
    """
    if prediction == "SLOW":
        time.sleep(60)
    return gold == prediction


class SlowReward(MathAnswerReward):
    check_fn = staticmethod(slow_check)


def nap_check(gold: str, prediction: str) -> bool:
    time.sleep(0.25)
    return gold == prediction


class NapReward(MathAnswerReward):
    check_fn = staticmethod(nap_check)


@pytest.fixture(scope="module")
def reward():
    r = MathAnswerReward()
    yield r
    r.close()


# --- extraction -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{3}"),
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("\\boxed{3} and finally \\fbox{9}", "9"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed{ \\boxed{ 6 } }", "6"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{a^{2}+b_{1}}", "a^{2}+b_{1}"),
        ("\\boxed{3} then truncated \\boxed{4", "3"),
        ("}}} \\boxed{7} {{{", "7"),
        ("no box here", None),
        ("\\boxed{", None),
        ("\\boxed{unclosed {inner}", None),
        ("\\\\boxed{3}", None),  # a LaTeX line break followed by the word "boxed"
        ("", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


def test_answer_block_is_preferred():
    text = "\\boxed{1} <answer>\\boxed{2}</answer> second thoughts: \\boxed{3}"
    assert extract_boxed_answer(text) == "2"
    # Only the last <answer> block counts; inside it the last box wins.
    text = "<answer>\\boxed{1}</answer> <answer>\\boxed{4} or \\boxed{5}</answer> \\boxed{6}"
    assert extract_boxed_answer(text) == "5"
    # An answer block without a box falls back to the last box anywhere.
    assert extract_boxed_answer("\\boxed{7} <answer>7</answer>") == "7"
    # A truncated answer block still counts.
    assert extract_boxed_answer("\\boxed{1} <answer>\\boxed{8}") == "8"


def test_interpreter_output_is_not_seen(reward):
    # The sandbox printed the right answer in a box; the model never wrote one.
    response = "<code>\n```python\nprint('\\\\boxed{7}')\n```\n</code>\n<interpreter>\n\\boxed{7}\n</interpreter>\n"
    model = "<code>\n```python\nprint('\\\\boxed{7}')\n```\n</code>\nso it is done"
    assert extract_boxed_answer(model) is None
    wrong = model + " <answer>\\boxed{8}</answer>"
    out = reward([traj(model, response), traj(wrong, response + " <answer>\\boxed{8}</answer>")], [problem("7")] * 2)
    assert out.rewards == [-1.0, -1.0]
    assert out.components["has_answer"] == [0.0, 1.0]


# --- scoring ----------------------------------------------------------------------------------------------


def test_correct_and_incorrect(reward):
    trajs = [traj("<answer>\\boxed{7006652}</answer>"), traj("\\boxed{7006653}"), traj("I give up")]
    out = reward(trajs, [problem("7006652")] * 3)
    assert out.rewards == [1.0, -1.0, -1.0]
    assert out.components == {
        "correct": [1.0, 0.0, 0.0],
        "has_answer": [1.0, 1.0, 0.0],
        "timed_out": [0.0, 0.0, 0.0],
    }


def test_reward_values_are_configurable():
    r = MathAnswerReward(correct=2.0, incorrect=0.0)
    try:
        assert r([traj("\\boxed{3}"), traj("\\boxed{4}")], [problem("3")] * 2).rewards == [2.0, 0.0]
    finally:
        r.close()


@pytest.mark.parametrize(("gold", "prediction"), [("\\frac{1}{2}", "0.5"), ("1/2", "\\frac{1}{2}"), ("0.5", "1/2")])
def test_equivalent_forms(reward, gold, prediction):
    assert reward([traj(f"\\boxed{{{prediction}}}")], [problem(gold)]).rewards == [1.0]


def test_equivalent_forms_batch(reward):
    cases = [
        ("\\frac{1}{3}", "1/3", True),
        ("1/3", "\\dfrac{1}{3}", True),
        ("x=2", "2", True),
        ("7006652", "7,006,652", True),
        ("3", "3.0", True),
        ("\\sqrt{2}", "2^{1/2}", True),
        ("1/3", "0.33", False),
        ("2", "-2", False),
        ("12", "}{", False),
    ]
    out = reward([traj(f"\\boxed{{{p}}}") for _, p, _ in cases], [problem(g) for g, _, _ in cases])
    assert out.components["correct"] == [float(ok) for _, _, ok in cases]


def test_no_answer_scores_incorrect(reward):
    out = reward([traj("The answer is 7."), traj("<answer>7</answer>")], [problem("7")] * 2)
    assert out.rewards == [-1.0, -1.0]
    assert out.components["has_answer"] == [0.0, 0.0]


def test_garbage_never_raises(reward):
    garbage = [
        "",
        "\\boxed{",
        "\\boxed{}",
        "\\boxed{{{{",
        "}}}}\\boxed}}{{",
        "\\boxed{\\boxed{\\boxed{",
        "\\boxed{\\frac{1}{0}}",
        "\\boxed{\\left( \\right.}",
        "<answer>\\boxed{</answer>",
        bytes(range(256)).decode("latin-1") * 10,
        "\\boxed{" + bytes(range(256)).decode("latin-1").replace("}", "") + "}",
        "\\boxed{\x00\ufffd\U0001f600}",
        "x\\boxed{" * 150_000 + "}" * 100,  # ~1 MB of nested, unclosed boxes
        "\\boxed{" + "9" * 1_000_000 + "}",  # a 1 MB answer
    ]
    start = time.monotonic()
    out = reward([traj(g) for g in garbage], [problem("12345")] * len(garbage))
    assert out.rewards == [-1.0] * len(garbage)
    assert out.components["timed_out"] == [0.0] * len(garbage)
    assert time.monotonic() - start < 10


def test_a_genuinely_slow_input_times_out():
    # math-verify takes ~20 s on this one; the reward gives up after timeout_s.
    r = MathAnswerReward(timeout_s=2.0)
    try:
        start = time.monotonic()
        out = r([traj("\\boxed{" + "(" * 5000 + "}"), traj("\\boxed{5}")], [problem("5")] * 2)
        assert time.monotonic() - start < 10
        assert out.components["timed_out"] == [1.0, 0.0]
        assert out.rewards == [-1.0, 1.0]
    finally:
        r.close()


def test_length_mismatch_names_the_fix(reward):
    with pytest.raises(ValueError, match="problems\\[i\\] for trajectories\\[i\\]"):
        reward([traj("\\boxed{1}")] * 2, [problem("1")])


def test_batch_of_64(reward):
    problems = [problem(str(1000 * i + 7)) for i in range(64)]
    trajs = [traj(f"\\boxed{{{1000 * i + 7 + (i % 2)}}}") for i in range(64)]
    out = reward(trajs, problems)
    assert out.components["correct"] == [float(i % 2 == 0) for i in range(64)]


def test_several_workers_agree_with_one(reward):
    problems = [problem(f"\\frac{{{i}}}{{4}}") for i in range(1, 21)]
    trajs = [traj(f"\\boxed{{{i / 4 if i % 3 else i / 5}}}") for i in range(1, 21)]
    many = MathAnswerReward(workers=2)
    try:
        assert many(trajs, problems) == reward(trajs, problems)
    finally:
        many.close()


def test_close_and_pickle_then_reuse():
    r = MathAnswerReward()
    assert r([traj("\\boxed{1}")], [problem("1")]).rewards == [1.0]
    copy = pickle.loads(pickle.dumps(r))  # e.g. a checkpoint's saved hyperparameters
    r.close()
    assert r([traj("\\boxed{2}")], [problem("2")]).rewards == [1.0]  # starts a new worker
    assert copy([traj("\\boxed{2}")], [problem("3")]).rewards == [-1.0]
    r.close()
    copy.close()


@pytest.mark.parametrize("bad", [{"timeout_s": 0}, {"workers": 0}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        MathAnswerReward(**bad)


# --- time limit -------------------------------------------------------------------------------------------


def test_time_limit_works_off_the_main_thread_and_recovers():
    r = SlowReward(timeout_s=2.0)
    results: dict[str, object] = {}

    def score() -> None:
        try:
            start = time.monotonic()
            trajs = [traj("\\boxed{5}"), traj("\\boxed{SLOW}"), traj("\\boxed{6}")]
            results["first"] = r(trajs, [problem("5")] * 3)
            results["elapsed"] = time.monotonic() - start
            results["second"] = r([traj("\\boxed{5}"), traj("\\boxed{6}")], [problem("5")] * 2)
        except BaseException as error:  # surfaced by the assertions below
            results["error"] = error

    try:
        thread = threading.Thread(target=score)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
        assert "error" not in results, results.get("error")
        first, second = results["first"], results["second"]
        assert first.components == {
            "correct": [1.0, 0.0, 0.0],
            "has_answer": [1.0, 1.0, 1.0],
            "timed_out": [0.0, 1.0, 0.0],
        }
        assert first.rewards == [1.0, -1.0, -1.0]
        assert results["elapsed"] < 30  # the 60 s sleep was cut off
        # The pool was restarted: the next call is scored normally.
        assert second.rewards == [1.0, -1.0]
        assert second.components["timed_out"] == [0.0, 0.0]
    finally:
        r.close()


def test_timeout_with_several_workers():
    r = SlowReward(timeout_s=2.0, workers=2)
    try:
        trajs = [traj(f"\\boxed{{{t}}}") for t in ["1", "SLOW", "2", "SLOW", "3", "4"]]
        out = r(trajs, [problem("2")] * len(trajs))
        assert out.components["timed_out"] == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
        assert out.components["correct"] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    finally:
        r.close()


def test_time_limit_is_per_check_not_per_batch():
    r = NapReward(timeout_s=1.0)
    try:
        trajs = [traj(f"\\boxed{{{i}}}") for i in range(8)]  # 8 checks of 0.25 s: 2 s in all
        out = r(trajs, [problem("3")] * 8)
        assert out.components["timed_out"] == [0.0] * 8
        assert out.components["correct"] == [float(i == 3) for i in range(8)]
    finally:
        r.close()
