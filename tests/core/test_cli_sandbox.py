"""``retool sandbox check``: the layers table, the self-tests, and exit codes that CI can rely on."""

from __future__ import annotations

import sys

import pytest

from retool import CheckResult, ExecutionResult, Executor
from retool.cli import main


class _Scripted(Executor):
    """An executor whose self-check reports what the class says; records that it was closed."""

    results: tuple[CheckResult, ...] = ()
    closed = 0

    async def execute(self, code: str, session: str) -> ExecutionResult:
        return ExecutionResult()

    async def close_session(self, session: str) -> None:
        pass

    async def aclose(self) -> None:
        type(self).closed += 1

    async def self_check(self) -> list[CheckResult]:
        return list(self.results)


class AllGood(_Scripted):
    results = (CheckResult("network", True, True, "no network"), CheckResult("note", True, None, "untested"))


class OneInactive(_Scripted):
    results = (CheckResult("network", True, True, "no network"), CheckResult("seccomp", False, None, "no pyseccomp"))


class OneBroken(_Scripted):
    results = (CheckResult("network", True, False, "the host port answered"), CheckResult("user", True, True, "uid"))


class NeedsAKey(_Scripted):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key


def _path(cls: type) -> str:
    return f"{__name__}.{cls.__name__}"


def test_all_layers_active_and_passing_exits_0(capsys) -> None:
    AllGood.closed = 0
    assert main(["sandbox", "check", "--executor", _path(AllGood)]) == 0
    out = capsys.readouterr().out
    assert "network" in out and "passed" in out and "untested" in out
    assert "every layer is active and held its self-test" in out
    assert AllGood.closed == 1  # the executor is closed after its check


def test_a_failed_self_test_exits_1(capsys) -> None:
    assert main(["sandbox", "check", "--executor", _path(OneBroken)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "self-test FAILED for network" in out and "the host port answered" in out


def test_an_inactive_layer_only_fails_with_strict(capsys) -> None:
    assert main(["sandbox", "check", f"--executor={_path(OneInactive)}"]) == 0
    assert "not active on this machine: seccomp" in capsys.readouterr().out
    assert main(["sandbox", "check", "--executor", _path(OneInactive), "--strict"]) == 1


def test_bad_usage_and_unknown_executors_exit_2(capsys) -> None:
    assert main(["sandbox", "check", "--executor", "LocalSandbx"]) == 2
    err = capsys.readouterr().err
    assert "unknown executor 'LocalSandbx'" in err and "did you mean 'LocalSandbox'" in err
    assert main(["sandbox", "check", "--frobnicate"]) == 2
    assert "unknown option '--frobnicate'" in capsys.readouterr().err  # and the options it does take
    assert main(["sandbox", "inspect"]) == 2
    assert main(["sandbox", "check", "--executor", _path(NeedsAKey)]) == 2
    assert "could not be created" in capsys.readouterr().err
    assert main(["sandbox"]) == 2 and main(["sandbox", "--help"]) == 0


def test_without_executor_every_discovered_one_that_checks_itself_is_checked(capsys, monkeypatch) -> None:
    monkeypatch.setenv("RETOOL_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("RETOOL_PLUGINS", __name__)  # this module's executors, and only them
    assert main(["sandbox", "check"]) == 1  # OneBroken fails the run
    out = capsys.readouterr().out
    for name in ("AllGood", "OneInactive", "OneBroken"):
        assert f"{name}: isolation layers on this machine" in out
    assert "NeedsAKey: skipped, it could not be created here" in out  # reported, not fatal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LocalSandbox's layers are Linux's")
def test_local_sandbox_check_runs_every_self_test(capsys) -> None:
    code = main(["sandbox", "check", "--executor", "LocalSandbox"])
    out = capsys.readouterr().out
    assert "LocalSandbox: isolation layers on this machine" in out
    for layer in ("network", "filesystem", "pid-namespace", "user", "process-limit", "seccomp", "timeout"):
        assert layer in out
    assert "FAILED" not in out and code == 0  # an active layer whose attack got through would fail the command
