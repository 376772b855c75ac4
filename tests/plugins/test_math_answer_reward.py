from __future__ import annotations

import logging
import pickle
import threading
import time

import pytest

from retool.answer import final_boxes
from retool.types import Problem, Trajectory
from retool_plugins.rewards.math_answer import MathAnswerReward, answer_checks, answer_verdict, extract_boxed_answer


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


def broken_check(gold: str, prediction: str) -> bool:
    """A checker with a bug: one kind of error for most inputs, another for ``T``, a third, per input, for ``v*``."""
    if prediction == "T":
        raise TypeError("unsupported operand\nsecond line")
    if prediction.startswith("v"):
        raise ValueError(f"cannot read {prediction}")
    raise ValueError("broken checker")


class BrokenReward(MathAnswerReward):
    check_fn = staticmethod(broken_check)


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
        # One token without braces, as LaTeX reads it.
        ("\\boxed 5", "5"),
        ("\\boxed 42", "4"),
        ("\\boxed5.", "5"),
        ("\\boxed x", "x"),
        ("\\boxed\\pi", "\\pi"),
        ("\\boxed \\infty", "\\infty"),
        ("\\fbox 7", "7"),
        ("\\boxed{\\boxed 6}", "6"),
        ("\\boxed \\boxed{9}", "9"),
        ("\\boxedx", None),  # another command
        ("\\boxed (5)", None),
        ("\\\\boxed 3", None),
    ],
)
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>\\boxed{2} and \\boxed{3}</answer>", ["2", "3"]),
        ("<answer>\\boxed{2, 3}</answer>", ["2, 3"]),
        ("<answer>\\boxed{5} or \\fbox{6}</answer>", ["5", "6"]),
        ("<answer>\\boxed 5, \\boxed{5}</answer>", ["5", "5"]),
        ("\\boxed{1} <answer>\\boxed{2} \\boxed{3}</answer> \\boxed{4}", ["2", "3"]),
        ("\\boxed{1} then \\boxed{2} <answer>none</answer>", ["1", "2"]),  # no box in the block: all boxes count
        ("\\boxed{a \\boxed{b}} \\boxed{c}", ["a \\boxed{b}", "c"]),  # a box inside a box is part of it
        ("\\boxed{\\boxed{5}} \\boxed{ \\boxed{6} }", ["5", "6"]),
        ("\\boxed{3} \\boxed{4", ["3"]),
        ("no box", []),
        ("", []),
    ],
)
def test_final_boxes(text, expected):
    assert final_boxes(text) == expected
    assert extract_boxed_answer(text) == (expected[-1] if expected else None)


def test_answer_block_is_preferred():
    text = "\\boxed{1} <answer>\\boxed{2}</answer> second thoughts: \\boxed{3}"
    assert extract_boxed_answer(text) == "2"
    # Only the last <answer> block counts; extract_boxed_answer gives its last box.
    text = "<answer>\\boxed{1}</answer> <answer>\\boxed{4} or \\boxed{5}</answer> \\boxed{6}"
    assert extract_boxed_answer(text) == "5"
    assert final_boxes(text) == ["4", "5"]
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


def test_answer_checks():
    assert answer_checks([]) == ()
    assert answer_checks(["5"]) == ("5",)
    assert answer_checks(["5", "5", "5"]) == ("5",)  # repeated word for word: one answer
    assert answer_checks(["2", "3", "2"]) == ("2, 3", "2", "3")
    assert answer_checks([str(i) for i in range(16)])[0] == ", ".join(str(i) for i in range(16))
    assert answer_checks([str(i) for i in range(17)]) == ()  # an enumeration, not an answer
    assert answer_checks(["9" * 6000, "8" * 6000]) == ()  # too long together
    assert answer_verdict([]) is False
    assert answer_verdict([True]) is True
    assert answer_verdict([False]) is False
    assert answer_verdict([True, False, False]) is True  # the boxes together are the answer
    assert answer_verdict([False, True, True]) is True  # each box alone is the answer
    assert answer_verdict([False, True, False]) is False  # a hedge


def box_answer(*boxes: str, joiner: str = " and ") -> str:
    return "<answer>" + joiner.join(f"\\boxed{{{b}}}" for b in boxes) + "</answer>"


# (what the model wrote, ground truth, right?): one case per rule of the class docstring.
ANSWER_RULES = [
    # One box: as before.
    (box_answer("5"), "5", True),
    (box_answer("2, 3"), "2, 3", True),  # a list in one box
    (box_answer("3, 2"), "\\{2, 3\\}", True),
    # Several boxes are one list: a set in any order, a tuple in order.
    (box_answer("2", "3"), "2, 3", True),
    (box_answer("2", "3"), "\\{2, 3\\}", True),
    (box_answer("3", "2"), "\\{2, 3\\}", True),
    (box_answer("x=3", "x=2", joiner=", "), "2, 3", True),
    (box_answer("1", "2", "3"), "(1, 2, 3)", True),
    (box_answer("3", "2", "1"), "(1, 2, 3)", False),
    (box_answer("2", "3"), "2, 3, 4", False),  # an element missing
    (box_answer("2", "3", "4"), "2, 3", False),  # one too many
    (box_answer("2, 3", "4"), "2, 3, 4", True),
    (box_answer("2", "3"), "[2, 3]", False),  # an interval is not a list
    # The same answer repeated, word for word or in another form.
    (box_answer("5", "5"), "5", True),
    (box_answer("5", "5.0"), "5", True),
    (box_answer("\\frac{1}{2}", "0.5", joiner=", that is "), "1/2", True),
    (box_answer("2, 3", "\\{3, 2\\}", joiner=", that is "), "2, 3", True),
    # A hedge: two different values for one, whichever comes last.
    (box_answer("5", "6", joiner=" or "), "5", False),
    (box_answer("6", "5", joiner=" or "), "5", False),
    (box_answer("5", "6", joiner=" or "), "6", False),
    ("\\boxed{6} or maybe \\boxed{5}", "5", False),  # outside an <answer> block too
    ("scratch: \\boxed{6}. <answer>\\boxed{5}</answer>", "5", True),  # the block is the answer
    # One token without braces; \fbox like \boxed.
    ("<answer>\\boxed 5</answer>", "5", True),
    ("<answer>\\boxed 42</answer>", "42", False),  # LaTeX boxes the 4 alone
    ("<answer>\\boxed \\pi</answer>", "\\pi", True),
    ("<answer>\\fbox{5}</answer>", "5", True),
    # Too many different boxes.
    (box_answer(*(str(i) for i in range(1, 17))), ", ".join(str(i) for i in range(1, 17)), True),
    (box_answer(*(str(i) for i in range(1, 18))), ", ".join(str(i) for i in range(1, 18)), False),
]


def test_answer_rules(reward):
    out = reward([traj(text) for text, _, _ in ANSWER_RULES], [problem(gold) for _, gold, _ in ANSWER_RULES])
    wrong = [case for case, ok in zip(ANSWER_RULES, out.components["correct"], strict=True) if ok != case[2]]
    assert wrong == []
    assert out.components["has_answer"] == [1.0] * len(ANSWER_RULES)
    assert out.components["timed_out"] == [0.0] * len(ANSWER_RULES)


def test_no_answer_scores_incorrect(reward):
    out = reward([traj("The answer is 7."), traj("<answer>7</answer>")], [problem("7")] * 2)
    assert out.rewards == [-1.0, -1.0]
    assert out.components["has_answer"] == [0.0, 0.0]


def test_garbage_never_raises(reward, caplog):
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
    with caplog.at_level(logging.WARNING, logger="retool_plugins.rewards.math_answer"):
        out = reward([traj(g) for g in garbage], [problem("12345")] * len(garbage))
    assert out.rewards == [-1.0] * len(garbage)
    assert out.components["timed_out"] == [0.0] * len(garbage)
    assert time.monotonic() - start < 10
    assert caplog.records == []  # math-verify never raises on garbage: a warning would be noise


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


# --- a check_fn that raises --------------------------------------------------------------------------------


def test_check_fn_errors_are_logged_once_per_kind(caplog):
    r = BrokenReward()

    def warnings() -> list[str]:
        return [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]

    try:
        with caplog.at_level(logging.WARNING, logger="retool_plugins.rewards.math_answer"):
            trajs = [traj(f"\\boxed{{{i}}}") for i in range(12)] + [traj(box_answer("1", "2"))]
            out = r(trajs, [problem("5")] * len(trajs))
            assert out.rewards == [-1.0] * len(trajs)  # scored wrong, not raised
            assert out.components["timed_out"] == [0.0] * len(trajs)
            (first,) = warnings()
            assert "broken_check raised ValueError: broken checker" in first
            assert r([traj("\\boxed{7}")] * 3, [problem("7")] * 3).rewards == [-1.0] * 3
            assert len(warnings()) == 1  # the same kind again: not logged again

            assert r([traj("\\boxed{T}"), traj("\\boxed{8}")], [problem("5")] * 2).rewards == [-1.0, -1.0]
            assert len(warnings()) == 2
            assert "TypeError: unsupported operand (gold '5', prediction 'T')" in warnings()[1]
            assert r([traj("\\boxed{T}")], [problem("6")]).rewards == [-1.0]
            assert len(warnings()) == 2

            # A message that holds its input makes a kind per input: the log stops after a few.
            many = [traj(f"\\boxed{{v{i}}}") for i in range(40)]
            assert r(many, [problem("5")] * len(many)).rewards == [-1.0] * len(many)
            logged = warnings()
            assert len(logged) == 21  # up to 20 kinds in all, then one line saying that more are not logged
            assert "more kinds are counted but not logged" in logged[-1]
    finally:
        r.close()
