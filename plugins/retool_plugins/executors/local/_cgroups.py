"""The trainer's side of LocalSandbox's resource limits over all its sessions: cgroups, and a uid per worker.

Nothing here runs model code; it runs in the trainer and never blocks the event loop for more than a few
system calls.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

_CGROUP_NAME = re.compile(r"^retool-(\d+)-[0-9a-f]+$")
_SANDBOX_PIDS_MAX = 16384  # processes and threads of one sandbox, all sessions together
_UID_BASE = 1_900_000_000  # far above real users and the usual container subuid ranges
_UID_SPAN = 1_000_000


# ---- cgroups -----------------------------------------------------------------------------------------------


@dataclass
class Cgroups:
    """The sandbox's own cgroup v1 folders (pids and memory): total caps over every session, and OOM counts."""

    folders: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def procs(self) -> list[str]:
        """The ``cgroup.procs`` files the zygote writes itself into."""
        return [f"{folder}/cgroup.procs" for folder in self.folders]

    def oom_kills(self) -> int:
        """How many processes the memory cgroup's OOM killer has killed so far (0 without one)."""
        for folder in self.folders:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(folder, "memory.oom_control").read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        return 0

    def remove(self, wait_s: float = 2.0) -> None:
        """Remove the folders; their processes are dying, so a busy folder is retried for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        for folder in self.folders:
            while True:
                try:
                    os.rmdir(folder)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
        self.folders = []


def _cgroup_v1_folders() -> dict[str, str]:
    """controller -> the folder of this process's own cgroup, for the v1 ``pids`` and ``memory`` hierarchies."""
    mounts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            pre, _, post = line.partition(" - ")
            fstype, _, options = [*post.split(), "", "", ""][:3]
            if fstype == "cgroup":
                for controller in ("pids", "memory"):
                    if controller in options.split(","):
                        mounts[controller] = pre.split()[4]
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller in mounts:
                    own[controller] = mounts[controller] + path.rstrip("/")
    return own


def make_cgroups(memory_bytes: int, enabled: bool) -> Cgroups:
    """Create the sandbox's cgroups below the trainer's own: ``pids.max`` and ``memory.limit_in_bytes``.

    Returns an empty :class:`Cgroups` (with the reason in ``detail``) where they cannot be made: not root, no
    cgroup v1 ``pids``/``memory`` controllers (cgroup v2 is not supported yet), or not allowed.
    """
    if not enabled:
        return Cgroups(detail="off (isolation=False)")
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return Cgroups(detail="unavailable: needs root on Linux")
    own = _cgroup_v1_folders()
    missing = [c for c in ("pids", "memory") if c not in own]
    if missing:
        return Cgroups(detail=f"unavailable: no cgroup v1 {' or '.join(missing)} controller mounted")
    made = Cgroups()
    name = f"retool-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for controller, parent in sorted(own.items()):
            _remove_stale(parent)
            folder = f"{parent}/{name}"
            os.mkdir(folder)
            made.folders.append(folder)
            if controller == "pids":
                Path(folder, "pids.max").write_text(str(_SANDBOX_PIDS_MAX))
            else:
                Path(folder, "memory.limit_in_bytes").write_text(str(memory_bytes))
    except OSError as exc:
        made.remove()
        return Cgroups(detail=f"unavailable: {exc}")
    made.detail = f"pids.max {_SANDBOX_PIDS_MAX}, memory {memory_bytes // 2**20} MiB for all sessions together"
    return made


def _remove_stale(parent: str) -> None:
    """Remove the empty cgroups that sandboxes of dead trainers left behind."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            match = _CGROUP_NAME.match(entry)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                with contextlib.suppress(OSError):
                    os.rmdir(f"{parent}/{entry}")


# ---- uids ------------------------------------------------------------------------------------------------


class UidPool:
    """Hands out a uid of its own to each live worker, so that ``RLIMIT_NPROC`` bounds one session only."""

    def __init__(self) -> None:
        self.next = random.randrange(_UID_SPAN)  # two sandboxes on one machine rarely overlap
        self.used: set[int] = set()

    def take(self) -> int:
        while True:
            uid = _UID_BASE + self.next
            self.next = (self.next + 1) % _UID_SPAN
            if uid not in self.used:
                self.used.add(uid)
                return uid

    def give_back(self, uid: int | None) -> None:
        self.used.discard(uid)  # type: ignore[arg-type]
