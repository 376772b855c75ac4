"""``retool.distributed`` on two real processes (gloo on loopback), without a trainer."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_as_under_nccl(rank: int, port: int, out: str) -> None:
    from retool import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Under NCCL the objects must go through a gloo group: make the default group claim to be NCCL's.
        real = dist.get_backend
        distributed.dist.get_backend = lambda group=None: "nccl" if group is None else real(group)  # type: ignore[assignment]
        first = distributed.gather([torch.full((rank + 1, 3), float(rank))])
        second = distributed.gather([f"rank {rank}"])
        groups = list(distributed._OBJECT_GROUPS.values())
        distributed.dist.get_backend = real  # type: ignore[assignment]
        assert len(groups) == 1 and real(groups[0]) == "gloo"  # made once, reused
        assert [t.shape for t in first] == [(1, 3), (2, 3)] and float(first[1].sum()) == 6.0
        assert second == ["rank 0", "rank 1"]
        Path(out, f"ok{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def test_gather_goes_through_a_cpu_group_when_the_backend_is_not_gloo(tmp_path: Path) -> None:
    mp.spawn(_gather_as_under_nccl, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok0", "ok1"]
