from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from retool.types import Problem, Trace
from retool_plugins.datasets.trace_file import TraceFile

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "retool_sft_sample.jsonl"

RESPONSE = (
    "<code>\n```python\nprint(6 * 7)\n```\n</code>\n<interpreter>\n42\n</interpreter>\n<answer>\\boxed{42}</answer>"
)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def field_rows(n: int) -> list[dict]:
    return [
        {"id": f"q{i}", "prompt": f"What is {i} * 7?", "response": RESPONSE, "answer": i * 7, "source": "mine"}
        for i in range(n)
    ]


# ---- layouts ------------------------------------------------------------------------------------------------


def test_fields_layout_reads_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", field_rows(2))
    traces = TraceFile(str(path)).load_traces("train")
    assert [t.problem for t in traces] == [
        Problem(id="q0", prompt="What is 0 * 7?", answer="0", metadata={"source": "mine"}),
        Problem(id="q1", prompt="What is 1 * 7?", answer="7", metadata={"source": "mine"}),
    ]
    assert all(isinstance(t, Trace) and t.response == RESPONSE for t in traces)
    assert traces[1].metadata == {"source": str(path), "row": 2}


def test_fields_layout_dotted_fields_optional_answer_and_default_ids(tmp_path: Path) -> None:
    rows = [
        {"meta": {"q": "What is 2 + 2?", "level": 1}, "out": "<answer>\\boxed{4}</answer>"},
        {},  # a blank line in the file is skipped, so this row is the file's line 3
        {"meta": {"q": "What is 3 + 3?"}, "out": "<answer>\\boxed{6}</answer>", "gold": "6"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[2]) + "\n")
    dm = TraceFile(str(path), prompt_field="meta.q", response_field="out", answer_field="gold", id_field=None)
    traces = dm.load_traces("train")
    assert [t.problem.id for t in traces] == ["mine-1", "mine-3"]
    assert [t.problem.prompt for t in traces] == ["What is 2 + 2?", "What is 3 + 3?"]
    assert [t.problem.answer for t in traces] == ["", "6"]  # a row without the answer gets ""
    assert traces[0].problem.metadata == {"meta": {"level": 1}}
    assert dm.rows("train") == [rows[0], rows[2]]  # the rows as read, for `retool traces check --out`


def test_messages_layout_takes_first_user_and_last_assistant(tmp_path: Path) -> None:
    chat = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "Let me think."},
        {"role": "user", "content": "Use code, please."},
        {"role": "assistant", "content": RESPONSE},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"id": "c1", "chat": chat, "answer": "42"}])
    (trace,) = TraceFile(str(path), layout="messages", messages_field="chat").load_traces("train")
    assert trace.problem == Problem(id="c1", prompt="What is 6 * 7?", answer="42")
    assert trace.response == RESPONSE


def test_messages_layout_refuses_tool_messages_and_chats_without_turns(tmp_path: Path) -> None:
    tool_chat = [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "42"},
    ]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": tool_chat}])
    with pytest.raises(ValueError, match=r"row 1: the chat has tool messages.*<interpreter> blocks"):
        TraceFile(str(path), layout="messages").load_traces("train")
    path = write_jsonl(tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match="no assistant message"):
        TraceFile(str(path), layout="messages").load_traces("train")


def test_retool_sft_layout_reads_the_fixture() -> None:
    traces = TraceFile(str(FIXTURE), layout="retool-sft").load_traces("train")
    assert len(traces) == 7
    first = traces[0]
    assert first.problem.prompt == (
        "Two fair six-sided dice are rolled. What is the probability that the sum of the numbers shown is 7? "
        "Express your answer as a common fraction."
    )
    for trace in traces:  # the bare question: no template, marker, reminder or answer tags
        for leftover in ("*user question:*", "Remember to place", "<answer>", "</answer>", "sandbox"):
            assert leftover not in trace.problem.prompt
    # No gold answers in this set: the answer is the trace's own last \boxed{}, and says so.
    assert [t.problem.answer for t in traces] == ["\\frac{1}{6}", "467", "120", "4", "426", "21", ""]
    assert all(t.problem.metadata == {"answer_from": "trace"} for t in traces)
    assert all(t.metadata["answer_from"] == "trace" for t in traces)
    assert traces[2].problem.id == "retool_sft_sample-3"
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert [t.response for t in traces] == [row["messages"][1]["content"] for row in rows]  # the assistant turn as is


def test_retool_sft_layout_without_the_marker_names_the_fix(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": RESPONSE}]
    path = write_jsonl(tmp_path / "plain.jsonl", [{"messages": chat}])
    with pytest.raises(ValueError, match=r"\*user question:\*.*layout='messages'"):
        TraceFile(str(path), layout="retool-sft").load_traces("train")


# ---- sources ------------------------------------------------------------------------------------------------


def test_parquet_file(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(field_rows(3)), path)
    dm = TraceFile(str(path), limit=2)
    traces = dm.load_traces("train")
    assert [t.problem.id for t in traces] == ["q0", "q1"]
    assert traces[1].problem.answer == "7" and traces[1].metadata["row"] == 2


def test_parquet_without_pyarrow_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sft.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'retool\[data\]'"):
        TraceFile(str(path)).load_traces("train")


def test_save_to_disk_folder_and_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    chats = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": RESPONSE}]}
        for i in range(3)
    ]
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(chats[:2]), "test": datasets.Dataset.from_list(chats[2:])}
    ).save_to_disk(str(folder))
    train = TraceFile(str(folder), layout="messages").load_traces("train")
    assert [t.problem.prompt for t in train] == ["Q0", "Q1"]
    test = TraceFile(str(folder), layout="messages", split="test").load_traces("train")
    assert [t.problem.prompt for t in test] == ["Q2"]
    with pytest.raises(ValueError, match=r"no split 'dev'.*\['test', 'train'\]"):
        TraceFile(str(folder), layout="messages", split="dev").load_traces("train")

    single = tmp_path / "single"  # a Dataset (not a dict): the split does not apply
    datasets.Dataset.from_list(field_rows(2)).save_to_disk(str(single))
    assert [t.problem.id for t in TraceFile(str(single)).load_traces("train")] == ["q0", "q1"]


def test_folder_downloaded_from_the_hub(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:2]]
    (tmp_path / "ReTool-SFT" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ReTool-SFT" / "data" / "train-00000-of-00001.parquet")
    traces = TraceFile(str(tmp_path / "ReTool-SFT"), layout="retool-sft").load_traces("train")
    assert [t.problem.answer for t in traces] == ["\\frac{1}{6}", "467"]


def test_hub_id_when_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'JoeYing/ReTool-SFT' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"Hub.*unreachable.*hf download --repo-type dataset JoeYing/ReTool-SFT"):
        TraceFile("JoeYing/ReTool-SFT", layout="retool-sft").load_traces("train")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist"):
        TraceFile(str(tmp_path / "nope.jsonl")).load_traces("train")
    with pytest.raises(ValueError, match=r"\.csv file; use a \.jsonl or \.parquet file"):
        (tmp_path / "data.csv").write_text("a,b\n")
        TraceFile(str(tmp_path / "data.csv")).load_traces("train")


def test_missing_field_names_file_row_field_and_keys(tmp_path: Path) -> None:
    rows = field_rows(2)
    del rows[1]["response"]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError) as error:
        TraceFile(str(path)).load_traces("train")
    message = str(error.value)
    assert str(path) in message and "row 2" in message and "'response'" in message
    assert "['answer', 'id', 'prompt', 'source']" in message and "response_field" in message


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="layout must be one of 'fields', 'messages', 'retool-sft'"):
        TraceFile("x.jsonl", layout="sharegpt")
    with pytest.raises(ValueError, match="num_val"):
        TraceFile("x.jsonl", num_val=-1)


# ---- splits -------------------------------------------------------------------------------------------------


def test_val_holds_out_the_last_traces_and_is_disjoint(tmp_path: Path) -> None:
    rows = field_rows(6)
    rows[1]["id"] = "q5"  # a second solution of the held-out problem q5: it must not stay in training
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    dm = TraceFile(str(path), num_val=2)
    train, val = dm.load_traces("train"), dm.load_traces("val")
    assert [t.problem.id for t in val] == ["q4", "q5"]
    assert [t.problem.id for t in train] == ["q0", "q2", "q3"]
    assert not {t.problem.id for t in train} & {t.problem.id for t in val}
    assert not {t.problem.prompt for t in train} & {t.problem.prompt for t in val}
    assert [p.id for p in dm.load_problems("val")] == ["q4", "q5"]
    assert [p.id for p in dm.load_problems("train")] == ["q0", "q2", "q3"]
    assert len(dm.rows("train")) == 3 and dm.rows("val") == rows[4:]
    assert TraceFile(str(path)).load_traces("val") == []  # num_val defaults to 0
    with pytest.raises(ValueError, match="leaves no training traces"):
        TraceFile(str(path), num_val=6).load_traces("train")


def test_problems_of_shared_ids_once_and_val_path(tmp_path: Path) -> None:
    rows = field_rows(2) + field_rows(1)  # q0 twice: two solutions of one problem
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"question": "What is 9 * 9?", "gold": 81}])
    dm = TraceFile(str(path), val_path=str(val), val_prompt_field="question", val_answer_field="gold")
    assert len(dm.load_traces("train")) == 3
    assert [p.id for p in dm.load_problems("train")] == ["q0", "q1"]
    assert dm.load_problems("val") == [Problem(id="val-1", prompt="What is 9 * 9?", answer="81")]
    with pytest.raises(ValueError, match=r"val\.jsonl:1: no 'prompt'.*val_prompt_field"):
        TraceFile(str(path), val_path=str(val)).load_problems("val")
