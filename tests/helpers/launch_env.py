"""The environment of a ``retool`` process that a test starts (the multi-process and resume tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parent

# What a launcher sets for its processes: a run started by a test picks its own rendezvous, whatever an earlier
# test of this session left in the environment.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                      "LOCAL_WORLD_SIZE", "RETOOL_RUN_DIR")  # fmt: skip


def run_environment() -> dict[str, str]:
    """This process's environment, with the test plugins importable (``RETOOL_PLUGINS=ddp_plugins``), no launcher
    variables, and Python's fault handler on (a process aborted by a failed collective shows its stack)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(RETOOL_PLUGINS="ddp_plugins", PYTHONPATH=os.pathsep.join([str(HELPERS), *sys.path]))
    env["PYTHONFAULTHANDLER"] = "1"
    return env
