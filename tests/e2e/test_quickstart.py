"""One step of the real quickstart, end to end: SmolLM2-135M-Instruct, GRPO, real code execution (CI runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retool.cli import main

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_one_step_of_the_quickstart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    code = main(
        ["fit", "--recipe", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.max_steps", "1",
         "--run_dir", str(run_dir)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    (step,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert step["step"] == 1
    assert step["response/model_tokens"] > 0 and step["perf/generate_tokens_per_s"] > 0
    assert -1 <= step["reward/mean"] <= 1
    samples = [json.loads(line) for line in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] and "response" in s for s in samples)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert model.config.num_hidden_layers == 30
