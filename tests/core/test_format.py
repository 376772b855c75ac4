from __future__ import annotations

import pytest

from retool import ExecutionResult, Problem, ReToolFormat, TextOnlyFormat


@pytest.fixture
def fmt() -> ReToolFormat:
    return ReToolFormat()


def test_tagged_cell_waits_for_close_tag(fmt: ReToolFormat) -> None:
    text = "Let me compute.\n<code>\n```python\nprint(2 + 2)\n```\n"
    assert not fmt.cell_closed(text)  # the fence closed but the <code> cell did not
    text += "</code>"
    assert fmt.cell_closed(text)
    assert fmt.extract_code(text) == "print(2 + 2)"


def test_bare_fence_closes_at_backticks(fmt: ReToolFormat) -> None:
    assert not fmt.cell_closed("Here:\n```python\nx = 3\n")
    text = "Here:\n```python\nx = 3\nprint(x * 2)\n```"
    assert fmt.cell_closed(text)
    assert fmt.extract_code(text) == "x = 3\nprint(x * 2)"


def test_non_python_fence_and_plain_text_are_not_cells(fmt: ReToolFormat) -> None:
    assert not fmt.cell_closed("```text\nhello\n```")
    assert not fmt.cell_closed("The answer is <answer>\\boxed{3}</answer>")
    assert fmt.extract_code("no code here") is None


def test_last_cell_is_the_one_extracted(fmt: ReToolFormat) -> None:
    text = "<code>\n```python\na = 1\n```\n</code> then more <code>\n```python\nb = 2\n```\n</code>"
    assert fmt.extract_code(text) == "b = 2"


def test_tagged_cell_without_fence(fmt: ReToolFormat) -> None:
    assert fmt.extract_code("<code>\nprint(5)\n</code>") == "print(5)"


def test_feedback_shows_output_errors_and_restarts(fmt: ReToolFormat) -> None:
    assert fmt.feedback(ExecutionResult(stdout="42\n")) == "\n<interpreter>\n42\n</interpreter>\n"
    err = fmt.feedback(ExecutionResult(stdout="partial\n", error="ZeroDivisionError: division by zero"))
    assert "partial" in err and "ZeroDivisionError: division by zero" in err
    timeout = fmt.feedback(ExecutionResult(timed_out=True, stop_reason="timeout"))
    assert "TimeoutError" in timeout
    restarted = fmt.feedback(ExecutionResult(stdout="1\n", session_restarted=True))
    assert "restarted" in restarted
    assert fmt.empty_output in fmt.feedback(ExecutionResult())


def test_messages_put_the_question_in_the_instructions() -> None:
    fmt = ReToolFormat(system_prompt="sys")
    messages = fmt.messages(Problem("p", "What is 2+2?", "4"))
    assert messages[0] == {"role": "system", "content": "sys"}
    assert messages[1]["role"] == "user" and messages[1]["content"].endswith("Problem: What is 2+2?")
    assert "<code>" in messages[1]["content"] and "\\boxed" in messages[1]["content"]
    with pytest.raises(ValueError, match="question"):
        ReToolFormat(instructions="no placeholder")


def test_example_is_optional_and_bad_placeholders_fail_early() -> None:
    with_example = ReToolFormat().messages(Problem("p", "Q?", "1"))[-1]["content"]
    assert "Example:" in with_example and with_example.index("Example:") < with_example.index("Problem: Q?")
    without = ReToolFormat(example=None).messages(Problem("p", "Q?", "1"))[-1]["content"]
    assert "Example:" not in without and without.endswith("Problem: Q?")
    with pytest.raises(ValueError, match="placeholders"):
        ReToolFormat(instructions="Answer {question} in {format}")
    literal = ReToolFormat(instructions="Use {{braces}}: {question}", example=None)
    assert literal.messages(Problem("p", "Q?", "1"))[-1]["content"] == "Use {braces}: Q?"


def test_text_only_format_has_no_tools() -> None:
    fmt = TextOnlyFormat()
    content = fmt.messages(Problem("p", "What is 2+2?", "4"))[-1]["content"]
    assert "<code>" not in content and "\\boxed" in content and content.endswith("Problem: What is 2+2?")
    assert not fmt.cell_closed("```python\nprint(1)\n```\n</code>")
    assert fmt.extract_code("<code>print(1)</code>") is None


def test_split_response_masks_each_interpreter_block_with_its_newlines() -> None:
    from retool.rollout.format import ReToolFormat

    text = (
        "a<code>\n```python\nprint(1)\n```\n</code>\n<interpreter>\n1\n</interpreter>\nb\n<interpreter>x</interpreter>c"
    )
    pieces = ReToolFormat().split_response(text)
    assert "".join(p for p, _ in pieces) == text
    assert pieces == [
        ("a<code>\n```python\nprint(1)\n```\n</code>", True),
        ("\n<interpreter>\n1\n</interpreter>\n", False),
        ("b", True),
        ("\n<interpreter>x</interpreter>", False),
        ("c", True),
    ]


def test_split_response_keeps_an_unclosed_block_as_model_text() -> None:
    from retool.rollout.format import ReToolFormat, TextOnlyFormat

    assert ReToolFormat().split_response("x <interpreter> never closed") == [("x <interpreter> never closed", True)]
    assert TextOnlyFormat().split_response("<interpreter>1</interpreter>") == [("<interpreter>1</interpreter>", True)]
    assert ReToolFormat().split_response("") == []
