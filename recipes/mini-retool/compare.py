"""The ReTool paper's comparison in miniature: text-only SFT then text-only RL, versus code SFT then tool RL
(GRPO, and the paper's PPO).

Same model (SmolLM2-135M-Instruct), same problems (MathFamilies, seed 0: the same train/held-out split in
every run), same number of RL steps. Arms: ``text`` (text SFT, then GRPO without tools), ``code`` (code SFT,
then GRPO with the interpreter) and ``code-ppo`` (the same code SFT, then PPO). Each SFT stage runs once: on
CPU it is deterministic given the data (no dropout, a fixed data order), so every seed would reproduce it
exactly; the seeds vary the RL stage (``seed_everything`` and the rollout's sampling seed). Writes into ``--out``:

* ``results.md`` / ``results.json``: held-out greedy accuracy before SFT, after SFT and after RL (mean and
  spread over seeds), the RL gain against the seed-to-seed spread, and the paper's metrics after RL;
* ``accuracy.png`` and ``paper_metrics.png``: evaluation curves against RL steps (0 = after SFT), mean and
  ±1 std over seeds per arm; ``reward.png``: the training reward per RL step;
* one run directory per stage (``code-sft``, ``code-rl-seed0``, ...), each readable with ``retool report``.

Run (its time on 2 CPU cores: docs/mini-retool.md):  python recipes/mini-retool/compare.py --out runs/mini-retool
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from retool.report import load_run, plot_curves, plot_panels

HERE = Path(__file__).resolve().parent
ARMS = {"text": ("text-sft", "text-rl"), "code": ("code-sft", "code-rl"), "code-ppo": ("code-sft", "code-ppo")}
"""Each arm: its SFT stage and its RL stage (recipe names; the code arms share their SFT stage)."""
PAPER = [
    ("eval/code_ratio", "code ratio"),
    ("eval/code_lines", "code lines"),
    ("eval/cell_ok", "cell ok"),
    ("eval/last_cell_ok", "last cell ok"),
    ("eval/first_cell_pos", "1st cell pos"),
    ("eval/response_length", "response tokens"),
]


def fit(recipe: Path, run_dir: Path, *overrides: str) -> None:
    """One ``retool fit`` stage in its own process; an existing finished stage is kept (resumable)."""
    if (run_dir / "policy" / "config.json").is_file() and (run_dir / "evaluation.jsonl").is_file():
        print(f"[compare] {run_dir} is done; skipping", flush=True)
        return
    if run_dir.exists():  # a stage cut short: start it again from scratch
        import shutil

        shutil.rmtree(run_dir)
    command = [
        sys.executable,
        "-m",
        "retool.cli",
        "fit",
        "--recipe",
        str(recipe),
        "--run_dir",
        str(run_dir),
        *overrides,
    ]
    print(f"[compare] {' '.join(command)}", flush=True)
    start = time.monotonic()
    subprocess.run(command, check=True)
    print(f"[compare] {run_dir.name}: {time.monotonic() - start:.0f} s", flush=True)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; an undefined metric (NaN: e.g. the first cell's position with no cells) stays NaN."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(out: Path, seeds: list[int], rl_steps: int, arms: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {"seeds": seeds, "rl_steps": rl_steps, "arms": {}}
    accuracy: dict[str, list[tuple[int, float, float]]] = {}
    paper: dict[str, dict[str, list[tuple[int, float, float]]]] = {label: {} for _, label in PAPER}
    reward: dict[str, list[tuple[int, float, float]]] = {}
    for arm in arms:
        sft_stage, rl_stage = ARMS[arm]
        sft = load_run(out / sft_stage).evaluation
        rls = [load_run(out / f"{rl_stage}-seed{s}") for s in seeds]
        before, after_sft = sft[0], sft[-1]
        finals = [run.evaluation[-1] for run in rls]
        gain = [f["eval/accuracy"] - after_sft["eval/accuracy"] for f in finals]
        arm_result = {
            "before_sft": before["eval/accuracy"],
            "after_sft": after_sft["eval/accuracy"],
            "after_rl": mean_std([f["eval/accuracy"] for f in finals]),
            "rl_gain": mean_std(gain),
            "after_rl_per_seed": [f["eval/accuracy"] for f in finals],
            "paper_after_sft": {k: after_sft.get(k) for k, _ in PAPER},
            "paper_after_rl": {k: mean_std([float(f.get(k, float("nan"))) for f in finals]) for k, _ in PAPER},
            "train_reward_first_last": [
                mean_std([run.metrics[0]["reward/mean"] for run in rls]),
                mean_std([run.metrics[-1]["reward/mean"] for run in rls]),
            ],
        }
        results["arms"][arm] = arm_result
        # Curves against RL steps: step 0 is the SFT policy (its last evaluation), shared by every seed.
        steps = sorted({row["step"] for run in rls for row in run.evaluation})
        curve = [(0, after_sft["eval/accuracy"], 0.0)]
        for step in steps:
            values = [row["eval/accuracy"] for run in rls for row in run.evaluation if row["step"] == step]
            curve.append((step, *mean_std(values)))
        accuracy[f"{arm} (SFT then RL)"] = curve
        accuracy[f"{arm}: before SFT"] = [(0, before["eval/accuracy"]), (rl_steps, before["eval/accuracy"])]
        for key, label in PAPER:
            points = [(0, float(after_sft.get(key, float("nan"))), 0.0)]
            for step in steps:
                values = [
                    float(row.get(key, float("nan"))) for run in rls for row in run.evaluation if row["step"] == step
                ]
                points.append((step, *mean_std(values)))
            paper[label][arm] = points
        reward[arm] = [
            (step, *mean_std([row["reward/mean"] for run in rls for row in run.metrics if row["step"] == step]))
            for step in range(1, rl_steps + 1)
        ]
    plot_curves(accuracy, out / "accuracy.png", "held-out greedy accuracy (mean ± std over seeds)", xlabel="RL step")
    panels = list(paper.items())
    plot_panels(panels, out / "paper_metrics.png", "the paper's metrics on held-out problems", xlabel="RL step")
    plot_curves(reward, out / "reward.png", "training reward (mean ± std over seeds)", xlabel="RL step")
    return results


def markdown(results: dict[str, Any]) -> str:
    def pm(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.3f} ± {pair[1]:.3f}"

    lines = [
        f"Seeds {results['seeds']}, {results['rl_steps']} RL steps, 32 held-out problems, greedy accuracy.",
        "",
        "| arm | before SFT | after SFT | after RL (mean ± std) | RL gain (mean ± std) | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in results["arms"].items():
        per_seed = ", ".join(f"{v:.3f}" for v in r["after_rl_per_seed"])
        cells = [f"{r['before_sft']:.3f}", f"{r['after_sft']:.3f}", pm(r["after_rl"]), pm(r["rl_gain"]), per_seed]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| arm | stage | " + " | ".join(label for _, label in PAPER) + " |",
        "|---|---|" + "---|" * len(PAPER),
    ]
    for arm, r in results["arms"].items():
        sft = [r["paper_after_sft"].get(k) for k, _ in PAPER]
        lines.append(f"| {arm} | after SFT | " + " | ".join("-" if v is None else f"{v:.2f}" for v in sft) + " |")
        lines.append(f"| {arm} | after RL | " + " | ".join(f"{r['paper_after_rl'][k][0]:.2f}" for k, _ in PAPER) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mini-retool", help="Folder for every run and the results.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds per arm.")
    parser.add_argument("--rl_steps", type=int, default=8, help="RL steps per run (the same for both arms).")
    parser.add_argument("--summarize_only", action="store_true", help="Only rebuild the table and plots.")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="Which arms to run.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not args.summarize_only:
        for arm in args.arms:
            sft_stage, rl_stage = ARMS[arm]
            fit(HERE / f"{sft_stage}.yaml", out / sft_stage)
            for seed in args.seeds:
                fit(
                    HERE / f"{rl_stage}.yaml",
                    out / f"{rl_stage}-seed{seed}",
                    "--policy.name_or_path",
                    str(out / sft_stage / "policy"),
                    "--seed_everything",
                    str(seed),
                    "--rollout.init_args.seed",
                    str(seed),
                    "--trainer.max_steps",
                    str(args.rl_steps),
                )
    results = summarize(out, args.seeds, args.rl_steps, args.arms)
    results["wall_s"] = time.monotonic() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    print(f"results, plots and runs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
