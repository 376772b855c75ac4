"""Update speed and memory: the padded update path against the packed one, on SmolLM2-135M-Instruct.

Run it from the repository root (the measured table and its commands: docs/performance.md)::

    python benchmarks/update.py               # both shapes, every path
    python benchmarks/update.py --quick       # a smoke run: tiny shapes, one timed update
    python benchmarks/update.py --markdown    # also print the table as Markdown (for docs/performance.md)

One *update* is what an RL step does after its rollout when it takes one on-policy pass (the quickstart's GRPO):
for each micro-batch, the response tokens' log-probs and entropies (``Algorithm.sequence_logprobs``), the clipped
policy loss (``PolicyGradient.loss``) and its backward pass; then gradient clipping and an AdamW step. Every
path runs retool's own code:

(a) padded (``pack_sequences: false``, the path before packing): every row padded to the longest prompt plus the
    longest response, ``(rows, response width, vocabulary)`` float32 logits;
(b) packed (``pack_sequences: true``): the real tokens of the micro-batch's rows in one row, attention within
    each trajectory, the head's log-probs ``logprob_chunk_tokens`` positions at a time (logits recomputed in the
    backward pass);
(c) packed+ckpt: (b) with the policy's ``gradient_checkpointing`` on (each decoder layer recomputed in the
    backward pass instead of keeping its activations);
(d) packed+bf16: (b) under bf16 autocast, as ``trainer.precision: bf16-mixed`` runs it (weights, gradients and
    AdamW's state stay float32; matrix products in bf16: fast where the CPU has AMX, and on GPUs).

A path that runs out of memory (the kernel's out-of-memory killer ends its process) is reported as such.

The trajectories are synthetic (random token ids: the cost does not depend on which tokens they are), with an
interpreter block (loss mask 0) in the middle of every response, at two shapes:

* ``quickstart``: 8 trajectories of about 300 tokens (prompts 140-160, responses 60-220), the quickstart's shape;
* ``long``: 8 trajectories, 4 of 2,048 tokens and 4 short ones (300-700), so that padding matters.

Each (shape, path) runs in a fresh process: the model is loaded, AdamW's state is created (one step with zero
gradients), then one update is run while a thread samples the process's resident memory every 5 ms (the *update
memory* is its peak above the resident memory before the update: activations, logits, gradients), then
``--repeats`` more updates are timed. Tokens/s counts the real tokens of the batch (prompts and responses) per
update over the best (shortest) timed update. On a GPU, memory is ``torch.cuda.max_memory_allocated`` above the
allocation before the update.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

from _tables import print_table  # benchmarks/_tables.py (the script's own folder is on sys.path)
from rich.console import Console

PATHS = ("padded", "packed", "packed+ckpt", "packed+bf16")
"""The paths compared: padded (``pack_sequences: false``), packed, packed with the policy's
``gradient_checkpointing`` on, and packed under bf16 autocast."""

SHAPES = {
    # (prompt tokens, response tokens) of each of the 8 trajectories
    "quickstart": [(150, 120), (142, 60), (158, 220), (147, 95), (153, 180), (140, 150), (160, 75), (145, 130)],
    "long": [(300, 1748), (420, 1628), (250, 1798), (380, 1668), (150, 400), (200, 150), (180, 520), (160, 300)],
    "quick": [(20, 30), (15, 10), (25, 40), (18, 22)],
}


def trajectories(shape: str, seed: int = 0) -> list[Any]:
    from retool.types import Trajectory

    rng = random.Random(seed)
    out = []
    for i, (prompt, response) in enumerate(SHAPES[shape]):
        tokens = [rng.randrange(100, 40_000) for _ in range(prompt + response)]
        mask = [0] * prompt + [1] * response
        third = response // 3
        for j in range(prompt + third, prompt + third + min(third, 40)):  # an interpreter block, up to 40 tokens
            mask[j] = 0
        out.append(Trajectory(f"p{i}", i % 4, tokens, mask, prompt, "", "", ""))
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The peak resident memory (or CUDA allocation) above where it stood on entry."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_bytes()
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def above_base(self) -> int:
        return self.peak - self.base


def run_one(shape: str, path: str, repeats: int, micro_batch_size: int, chunk: int) -> dict[str, Any]:
    """One (shape, path) in this process: load, warm the optimizer, one update measured for memory, then timed."""
    import gc

    import torch

    from retool.algorithm.batch import PolicyBatch
    from retool.policy import Policy
    from retool_plugins.algorithms.grpo import GRPO

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    packed = path != "padded"
    model = Policy("smollm2-135m-instruct", gradient_checkpointing=path == "packed+ckpt").load_model().to(device)
    algo = GRPO(micro_batch_size=micro_batch_size, pack_sequences=packed, logprob_chunk_tokens=chunk)
    algo.model = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():  # AdamW's state exists before anything is measured, as after a first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    trajs = trajectories(shape)
    rewards = [1.0 if i % 2 else -1.0 for i in range(len(trajs))]
    batch = PolicyBatch.from_trajectories(trajs, rewards, pad_id=0)
    batch.advantages = torch.tensor(rewards)[:, None].expand_as(batch.response_mask).clone()
    tokens = int(batch.attention_mask.sum())
    padded_tokens = int(batch.attention_mask.numel())

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=path == "packed+bf16")

    def update() -> float:
        start = time.perf_counter()
        model.train()
        token_count = batch.response_mask.sum().clamp(min=1)
        for index in algo.micro_batches(batch):
            part = batch.select(index)
            with autocast:  # the forward pass, as Lightning's bf16-mixed runs it; the backward follows its casts
                logprobs, entropy = algo.sequence_logprobs(model, part, with_entropy=True, temperature=1.0)
                loss, _ = algo.loss(part, logprobs, entropy, token_count)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    gc.collect()
    with PeakMemory(cuda) as memory:
        first = update()
    times = [update() for _ in range(repeats)]
    return {
        "shape": shape,
        "path": path,
        "tokens": tokens,
        "padded_tokens": padded_tokens,
        "first_s": first,
        "best_s": min(times),
        "tokens_per_s": tokens / min(times),
        "update_memory": memory.above_base,
        "device": torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads",
    }


def in_subprocess(shape: str, path: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """One (shape, path) in a fresh process; ``None`` if it ran out of memory (the table says so)."""
    command = [sys.executable, __file__, "--one", shape, "--path", path,
               "--repeats", str(args.repeats), "--micro-batch-size", str(args.micro_batch_size),
               "--chunk", str(args.chunk)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode == -9:  # the kernel's out-of-memory killer
        return None
    if done.returncode != 0:
        raise RuntimeError(f"{shape}/{path}: exit status {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_rate() -> float:
    """This machine's float32 matrix-product rate (GFLOP/s), median over the shapes of SmolLM2-135M's update."""
    import statistics

    import torch

    rates = []
    for m, k, n in [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (1024, 576, 49152)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        rates.append(2 * m * k * n * 10 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def floor_tokens_per_s(shape: str, gflops: float) -> float:
    """The update's tokens/s if every FLOP of its forward and backward passes ran at ``gflops``: 6 FLOPs per
    parameter per token for SmolLM2-135M's 30 decoder layers (106.2M parameters, the embedding excluded), 6 per
    head parameter per scored (response) token, and 6 L^2 d per layer for causal attention over a trajectory of
    L tokens; the optimizer step and everything else for free."""
    layers, d, vocab, layer_params = 30, 576, 49_152, 3_538_944
    tokens = sum(p + r for p, r in SHAPES[shape])
    scored = sum(r for _, r in SHAPES[shape])
    attention = sum(6 * (p + r) ** 2 * d * layers for p, r in SHAPES[shape])
    flops = 6 * layers * layer_params * tokens + 6 * d * vocab * scored + attention
    return tokens / (flops / (gflops * 1e9))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed updates after the measured one (2)")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="rows per pass, every path (8)")
    parser.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_tokens of the packed path (1024)")
    parser.add_argument("--shapes", default="quickstart,long", help="comma-separated: quickstart, long")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny shape, one timed update")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.path, args.repeats, args.micro_batch_size, args.chunk)))
        return 0

    console = Console()
    shapes = ["quick"] if args.quick else args.shapes.split(",")
    if args.quick:
        args.repeats = 1
    header = ["shape", "tokens (padded)", "path", "tokens/s", "vs padded", "update memory", "vs padded"]
    body = []
    device = ""
    for shape in shapes:
        results = {path: in_subprocess(shape, path, args) for path in PATHS}
        base = results["padded"]
        for path, result in results.items():
            if result is None:
                body.append([shape, "", path, "out of memory", "-", "-", "-"])
                continue
            device = result["device"]
            speed = f"{result['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            memory = f"{result['update_memory'] / max(base['update_memory'], 1):.2f}" if base else "-"
            body.append([
                shape if path == "padded" else "",
                f"{result['tokens']} ({result['padded_tokens']})" if path == "padded" else "",
                path, f"{result['tokens_per_s']:.0f}", speed, gib(result["update_memory"]), memory,
            ])  # fmt: skip
    rate = matmul_rate()
    for shape in shapes:
        if shape in ("quickstart", "long"):
            body.append([shape, "", "floor", f"{floor_tokens_per_s(shape, rate):.0f}", "", "", ""])
    one, five, _ = os.getloadavg()
    title = (
        f"The update, SmolLM2-135M-Instruct fp32, {device}; micro-batch {args.micro_batch_size} rows, chunk "
        f"{args.chunk}, best of {args.repeats}; matmul {rate:.0f} GFLOP/s (floor: FLOPs at that rate); load average "
        f"{one:.2f}, {five:.2f}"
    )
    print_table(console, title, header, body, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
