"""The paper's rollout metrics (ReTool §3.3) computed from trajectories."""

from __future__ import annotations

import math

from retool.metrics import rollout_metrics
from retool.types import ExecutionResult, ToolCall, Trajectory


def _trajectory(model_text: str, cells: list[tuple[str, bool]], finish: str = "eos") -> Trajectory:
    # 4 prompt tokens, then 10 model tokens; each cell's interpreter reply is 2 masked tokens after token 5.
    calls = [
        ToolCall(
            code, ExecutionResult(error=None if ok else "NameError: x"), "\n<interpreter>\n</interpreter>\n", 9, 11
        )
        for code, ok in cells
    ]
    mask = [0] * 4 + [1] * 5 + [0] * (2 if cells else 0) + [1] * 5
    return Trajectory(
        problem_id="p",
        group=0,
        token_ids=list(range(len(mask))),
        loss_mask=mask,
        prompt_len=4,
        prompt_text="",
        response_text="",
        model_text=model_text,
        tool_calls=calls,
        finish_reason=finish,  # type: ignore[arg-type]
    )


def test_paper_metrics() -> None:
    with_two = _trajectory(
        "abcd<code>x = 1\n\nprint(x)</code>..<code>y</code>", [("x = 1\n\nprint(x)", True), ("y", False)]
    )
    with_one = _trajectory("<code>print(2)</code> done", [("print(2)", True)])
    without = _trajectory("just text", [], finish="length")
    m = rollout_metrics([with_two, with_one, without])
    assert m["tools/code_ratio"] == 2 / 3
    assert m["tools/calls"] == 1.0
    assert m["tools/cell_ok"] == 2 / 3  # 2 of the 3 cells ran cleanly
    assert m["tools/last_cell_ok"] == 0.5  # the first trajectory's last cell failed, the second's did not
    assert m["tools/code_lines"] == (3 + 1) / 2  # non-blank lines per response with code: 2 + 1, then 1
    text = with_two.model_text
    expected = (text.find("x = 1") / len(text) + with_one.model_text.find("print(2)") / len(with_one.model_text)) / 2
    assert math.isclose(m["tools/first_cell_pos"], expected)
    assert m["finish/length"] == 1 / 3 and m["finish/eos"] == 2 / 3
    assert m["response/model_tokens"] == 10


def test_no_cells_no_position() -> None:
    m = rollout_metrics([_trajectory("text", [])])
    assert m["tools/code_ratio"] == 0 and m["tools/code_lines"] == 0 and m["tools/last_cell_ok"] == 0
    assert math.isnan(m["tools/first_cell_pos"])  # undefined, not 0 ("at the very start")
