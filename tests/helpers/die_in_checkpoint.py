"""Imported into a run through ``RETOOL_PLUGINS``: the process kills itself (SIGKILL) halfway through writing the
checkpoint of the step ``RETOOL_TEST_DIE_IN_CHECKPOINT`` names, as a run killed while it writes one would be."""

from __future__ import annotations

import io
import os
import signal
from typing import Any

import torch
from lightning.fabric.plugins.io import torch_io

_save = torch_io._atomic_save
STEP = os.environ.get("RETOOL_TEST_DIE_IN_CHECKPOINT")


def _half_then_die(checkpoint: Any, path: Any) -> None:
    if STEP and f"step={STEP}.ckpt" in str(path):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    _save(checkpoint, path)


torch_io._atomic_save = _half_then_die
