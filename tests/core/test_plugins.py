from __future__ import annotations

import importlib.metadata as md
import textwrap
from pathlib import Path

import pytest

import retool_plugins
from retool import plugins
from retool.plugins import PluginError


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in md.entry_points(group=plugins.ENTRY_POINT_GROUP)}


def test_every_builtin_plugin_module_has_an_entry_point() -> None:
    """A plugin is a public module or a public folder of a kind's folder (a folder holds one plugin's parts);
    names that start with an underscore are helpers that plugins share."""
    root = Path(retool_plugins.__file__).parent
    modules = {
        f"retool_plugins.{kind.name}.{path.stem}"
        for kind in root.iterdir()
        if kind.is_dir() and not kind.name.startswith("_")
        for path in kind.iterdir()
        if not path.name.startswith("_") and (path.suffix == ".py" or (path / "__init__.py").is_file())
    }
    registered = {value.split(":")[0] for value in _entry_points().values()}
    assert modules, "no built-in plugin modules found"
    assert modules == registered


def test_discover_finds_each_kind_with_package_and_version() -> None:
    found = {p.name: p for p in plugins.discover()}
    expected = {
        "GRPO": "algorithm",
        "HFRollout": "rollout",
        "LocalSandbox": "executor",
        "MathAnswerReward": "reward",
        "ArithmeticProblems": "data",
        "JsonlProblems": "data",
    }
    for name, kind in expected.items():
        assert found[name].kind == kind
        assert found[name].package == "retool" and found[name].version == md.version("retool")


def test_block_and_disable_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "GRPO" not in {p.name for p in plugins.discover(blocked=["GRPO"])}
    monkeypatch.setenv("RETOOL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert plugins.discover() == []


def test_retool_plugins_env_loads_a_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            from retool import Reward, RewardOutput

            class LengthReward(Reward):
                def __call__(self, trajectories, problems):
                    return RewardOutput([float(len(t.model_text)) for t in trajectories])
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("RETOOL_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("RETOOL_PLUGINS", "my_rewards")
    found = plugins.discover()
    assert [(p.kind, p.name, p.package) for p in found] == [
        (
            "reward",
            "LengthReward",
            "my_rewards",
        )
    ]
    monkeypatch.setenv("RETOOL_PLUGINS", "no_such_module_xyz")
    with pytest.raises(PluginError, match="no_such_module_xyz"):
        plugins.discover()


def test_check_class_path_names_the_fix() -> None:
    found = plugins.discover()
    plugins.check_class_path("algorithm", "GRPO", found)
    plugins.check_class_path("algorithm", "retool_plugins.algorithms.grpo.GRPO", found)
    with pytest.raises(PluginError, match=r"unknown executor 'LocalSandbx'; did you mean 'LocalSandbox'\?"):
        plugins.check_class_path("executor", "LocalSandbx", found)
    with pytest.raises(PluginError, match="cannot be imported"):
        plugins.check_class_path("reward", "nowhere.module.Reward", found)
    with pytest.raises(PluginError, match="not a subclass"):
        plugins.check_class_path("reward", "retool_plugins.algorithms.grpo.GRPO", found)


def test_the_core_never_imports_the_builtin_plugins() -> None:
    core = Path(__file__).parents[2] / "retool"
    offenders = [
        str(path.relative_to(core))
        for path in core.rglob("*.py")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith(("import retool_plugins", "from retool_plugins"))
    ]
    assert offenders == []


def _plugin_of(module: str) -> str | None:
    """``retool_plugins.KIND.NAME`` for a plugin's module or part; ``None`` for a shared private helper."""
    parts = module.split(".")
    if len(parts) < 3 or parts[0] != "retool_plugins":
        return None
    return None if parts[2].startswith("_") else ".".join(parts[:3])


def test_a_plugin_never_imports_another_plugin() -> None:
    """A need two plugins share becomes a private helper of their folder (or moves to the core), so a plugin
    can change, or be blocked with -p no:NAME, without breaking another."""
    import ast

    root = Path(retool_plugins.__file__).parent
    crossings = []
    for path in root.rglob("*.py"):
        here = _plugin_of(".".join(("retool_plugins", *path.relative_to(root).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                there = _plugin_of(name)
                if there is not None and there != here:
                    crossings.append(f"{path.relative_to(root)} imports {name}")
    assert not crossings, crossings
