"""The GPU smoke check (benchmarks/gpu_smoke.py) as a test: every case runs on the GPU (vLLM's when installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_gpu_path_takes_its_steps(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results), results
    assert all(r["steps"] == 2 and r["peak_gb"] > 0 for r in results if r["status"] == "ok")
