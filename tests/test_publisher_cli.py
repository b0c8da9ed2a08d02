"""``recstream publisher …`` and ``recstream redis …``: what each subcommand does, and its
one-line failures (status 1: the operator can act on it; status 2: a bad argument)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from publishing import control_for, publish_env

from batch.jobs import bootstrap_job
from common.data.dataset import Dataset
from common.data.datasets import load_dataset
from common.data.events import DAY_MS
from common.infra.redis_server import home_redis
from common.infra.settings import Settings, load_settings
from common.model.bundle import ModelBundle
from common.model.registry import Registry
from recstream.cli import EXIT_FAILED, EXIT_USAGE, main

GATE = "recall@50"
MISSING = "v000099"


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def line(self) -> str:
        """The one line on stderr (fails the test if there are more or none)."""
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got: {self.err!r}"
        return lines[0]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Result:
    """``recstream argv…`` in this process; argparse's exits become a status."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Result(code, out, err)


@dataclass(frozen=True)
class Trained:
    bundle: ModelBundle
    cutoff_ms: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """What ``--dataset synthetic`` loads: the CLI's own call, so versions match it."""
    return load_dataset("synthetic", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def trained(world: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One small bootstrap (first two days), registered again cheaply in each test."""
    home = tmp_path_factory.mktemp("bootstrap")
    settings = load_settings(publish_env(home, "", "unused"))
    cutoff = int(world.events.ts_ms.min()) // DAY_MS * DAY_MS + 2 * DAY_MS
    version = bootstrap_job(settings, world, None, cutoff, epochs=1, promote=True).version
    return Trained(Registry(settings.models_dir).load(version)[0], cutoff)


@dataclass
class Home:
    """A RECSTREAM_HOME with its own Redis prefix, and the CLI run against it."""

    settings: Settings
    world: Dataset
    trained: Trained
    capsys: pytest.CaptureFixture[str]

    def __call__(self, *argv: str) -> Result:
        return run(self.capsys, *argv)

    def register(self, recall: float | None = None) -> str:
        """A new registered version (not published), with ``recall@50`` if given."""
        return Registry(self.settings.models_dir).register(
            self.trained.bundle, kind="nightly", cutoff_ms=self.trained.cutoff_ms,
            parent=None, metrics={} if recall is None else {GATE: recall},
            config_hash=self.settings.model_hash())

    def published(self, recall: float | None = None) -> str:
        version = self.register(recall)
        control_for(self.settings).publish(version, self.world)
        return version

    def released(self, recall: float | None = None) -> str:
        """A published version made champion (the one before becomes previous)."""
        version = self.published(recall)
        control_for(self.settings).promote(version, force=True)
        return version

    def status(self) -> dict[str, Any]:
        result = self("publisher", "status")
        assert result.code == 0, result.err
        return json.loads(result.out)


def _clear_recstream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RECSTREAM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path: Path, redis_url: str, prefix: str, world: Dataset, trained: Trained,
         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Home:
    _clear_recstream_env(monkeypatch)
    env = publish_env(tmp_path, redis_url, prefix)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Home(load_settings(env), world, trained, capsys)


@pytest.fixture
def bare_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home without RECSTREAM_REDIS_URL: the embedded Redis launcher is used."""
    _clear_recstream_env(monkeypatch)
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path))
    return tmp_path


# -- help and bad arguments ----------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["publisher"], ["publisher", "status"], ["publisher", "versions"], ["publisher", "publish"],
    ["publisher", "promote"], ["publisher", "rollback"], ["redis"]])
def test_help_prints_usage_and_exits_0(capsys: pytest.CaptureFixture[str],
                                       args: list[str]) -> None:
    result = run(capsys, *args, "--help")
    assert result.code == 0
    assert result.out.startswith(f"usage: recstream {' '.join(args)}")


@pytest.mark.parametrize("args, expected", [
    (["publisher"], "required: publisher_command"),
    (["publisher", "frobnicate"], "invalid choice: 'frobnicate'"),
    (["publisher", "status", "--json"], "unrecognized arguments: --json"),
    (["publisher", "versions", "all"], "unrecognized arguments: all"),
    (["publisher", "publish"], "required: version"),
    (["publisher", "publish", "v000001", "--dataset", "netflix"], "invalid choice: 'netflix'"),
    (["publisher", "promote", "banana"], "expected a version like v000003"),
    (["publisher", "promote", "v3"], "expected a version like v000003"),
    (["publisher", "rollback", "--to", "7"], "expected a version like v000003"),
    (["redis"], "required: action"),
    (["redis", "restart"], "invalid choice: 'restart'"),
])
def test_bad_argument_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                             args: list[str], expected: str) -> None:
    result = run(capsys, *args)
    assert result.code == EXIT_USAGE
    assert expected in result.line
    assert result.out == ""


# -- status, versions, publish ---------------------------------------------------------

def test_status_of_a_fresh_home_has_no_champion(home: Home) -> None:
    status = home.status()
    assert status["release"]["champion"] is None and status["release"]["previous"] is None
    assert status["registry_aliases"]["champion"] is None
    assert status["consistent"] is True
    assert status["versions"] == []


def test_status_reports_release_aliases_memory_and_versions(home: Home) -> None:
    champion = home.released(recall=0.3)
    status = home.status()
    assert status["release"]["champion"] == champion and status["release"]["seq"] == 1
    assert status["registry_aliases"]["champion"] == champion and status["consistent"]
    assert status["redis_used_memory_bytes"] > 0
    [info] = status["versions"]
    assert info["version"] == champion and info["role"] == "champion"
    assert info["published"] == "complete" and info["index"] and info["users"] > 0
    assert info["metrics"] == {GATE: 0.3}
    # How its index searches (a small catalogue: exact, so there is no nprobe to sweep).
    assert info["index_search"]["kind"] == "flat" and info["index_search"]["items"] > 0


def test_versions_lists_every_version_with_its_role(home: Home) -> None:
    old, champion, unpublished = home.released(0.3), home.released(0.31), home.register()
    result = home("publisher", "versions")
    assert result.code == 0
    header, *rows = result.out.splitlines()
    assert header.split()[:6] == ["version", "role", "kind", "cutoff", "published", "users"]
    table = {row.split()[0]: row.split() for row in rows}
    assert list(table) == [old, champion, unpublished]
    assert table[old][1:5] == ["previous", "nightly", "2024-01-02", "complete"]
    assert table[old][-1] == "recall@50=0.3000"
    assert table[champion][1] == "champion" and table[champion][-1] == "recall@50=0.3100"
    assert table[unpublished][1] == "-" and table[unpublished][4] == "no"
    assert table[unpublished][-1] == "-"


def test_publish_writes_a_version_fully_without_releasing_it(home: Home) -> None:
    champion, version = home.released(0.3), home.register(0.3)
    result = home("publisher", "publish", version, "--dataset", "synthetic")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["version"] == version and report["users"] > 0 and report["items"] > 0
    status = home.status()
    assert status["release"]["champion"] == champion
    published = {v["version"]: v for v in status["versions"]}[version]
    assert published["published"] == "complete" and published["index"]
    assert published["role"] == ""


# -- promote -----------------------------------------------------------------------

def test_promote_makes_the_version_champion_and_the_old_one_previous(home: Home) -> None:
    old, new = home.released(0.3), home.published(0.3)
    result = home("publisher", "promote", new)
    assert result.code == 0, result.err
    assert result.out.strip() == f"champion={new} previous={old} seq=2"
    status = home.status()
    assert status["release"]["champion"] == new and status["release"]["previous"] == old
    assert status["registry_aliases"] == {"champion": new, "previous": old}
    assert status["consistent"]


def test_first_promote_has_no_gate(home: Home) -> None:
    version = home.published(recall=None)
    result = home("publisher", "promote", version)
    assert result.code == 0, result.err
    assert home.status()["release"]["champion"] == version


def test_promote_of_an_unpublished_version_says_to_publish_it(home: Home) -> None:
    home.released(0.3)
    version = home.register(0.4)
    result = home("publisher", "promote", version)
    assert result.code == EXIT_FAILED
    assert result.line.startswith("recstream publisher: error:")
    assert f"recstream publisher publish {version}" in result.line


@pytest.mark.parametrize("recall", [None, float("nan")], ids=["missing", "nan"])
def test_gate_refuses_a_version_without_a_usable_metric(home: Home,
                                                        recall: float | None) -> None:
    champion = home.released(0.3)
    version = home.published(recall)
    result = home("publisher", "promote", version)
    assert result.code == EXIT_FAILED
    assert version in result.line and GATE in result.line and "--force" in result.line
    assert home.status()["release"]["champion"] == champion


def test_force_promotes_past_the_gate(home: Home) -> None:
    champion = home.released(0.3)
    version = home.published(recall=None)
    result = home("publisher", "promote", version, "--force")
    assert result.code == 0, result.err
    assert result.out.strip() == f"champion={version} previous={champion} seq=2"


@pytest.mark.parametrize("recall, tolerance, promoted", [
    (0.25, None, False),  # 0.05 worse than the champion, default tolerance 0.02
    (0.29, None, True),
    (0.35, None, True),
    (0.25, "0.1", True),
    (0.29, "0", False),
])
def test_gate_compares_recall_with_the_champion_within_the_tolerance(
        home: Home, monkeypatch: pytest.MonkeyPatch, recall: float, tolerance: str | None,
        promoted: bool) -> None:
    if tolerance is not None:
        monkeypatch.setenv("RECSTREAM_EVAL_GATE_TOLERANCE", tolerance)
    champion = home.released(0.3)
    version = home.published(recall)
    result = home("publisher", "promote", version)
    if promoted:
        assert result.code == 0, result.err
        assert home.status()["release"]["champion"] == version
    else:
        assert result.code == EXIT_FAILED
        assert "worse than champion" in result.line and "--force" in result.line
        assert home.status()["release"]["champion"] == champion


# -- rollback ------------------------------------------------------------------------

def test_rollback_serves_the_previous_version_again(home: Home) -> None:
    old, new = home.released(0.3), home.released(0.3)
    result = home("publisher", "rollback")
    assert result.code == 0, result.err
    assert result.out.startswith(f"champion={old} ")
    status = home.status()
    assert status["release"]["champion"] == old
    assert status["registry_aliases"]["champion"] == old and status["consistent"]
    roles = {v["version"]: v["role"] for v in status["versions"]}
    assert roles[old] == "champion" and roles[new] in ("previous", "withdrawn")


def test_rollback_to_serves_the_named_version(home: Home) -> None:
    first, _, _ = home.released(0.3), home.released(0.3), home.released(0.3)
    result = home("publisher", "rollback", "--to", first)
    assert result.code == 0, result.err
    assert home.status()["release"]["champion"] == first


@pytest.mark.parametrize("releases, expected", [
    (0, "nothing is released yet"), (1, "no previous version to roll back to")])
def test_rollback_without_a_previous_version_fails_clearly(home: Home, releases: int,
                                                           expected: str) -> None:
    for _ in range(releases):
        home.released(0.3)
    result = home("publisher", "rollback")
    assert result.code == EXIT_FAILED
    assert result.line.startswith("recstream publisher: error:") and expected in result.line


def test_rollback_to_the_champion_is_refused(home: Home) -> None:
    home.released(0.3)
    champion = home.released(0.3)
    result = home("publisher", "rollback", "--to", champion)
    assert result.code == EXIT_FAILED
    assert f"{champion} is already the champion" in result.line


def test_rollback_to_an_unpublished_version_fails(home: Home) -> None:
    home.released(0.3)
    home.released(0.3)
    version = home.register(0.3)
    result = home("publisher", "rollback", "--to", version)
    assert result.code == EXIT_FAILED
    assert f"recstream publisher publish {version}" in result.line


@pytest.mark.parametrize("args", [
    ["publish", MISSING, "--dataset", "synthetic"], ["promote", MISSING],
    ["rollback", "--to", MISSING]], ids=["publish", "promote", "rollback"])
def test_missing_version_is_one_line_naming_it_and_exit_1(home: Home,
                                                          args: list[str]) -> None:
    home.released(0.3)
    result = home("publisher", *args)
    assert result.code == EXIT_FAILED
    assert result.line.startswith("recstream publisher: error:") and MISSING in result.line


# -- redis -------------------------------------------------------------------------

def test_redis_start_status_stop_manage_the_home_server(
        bare_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        started = run(capsys, "redis", "start")
        assert started.code == 0, started.err
        url = started.out.strip()
        assert url.startswith("redis://")
        assert redis.Redis.from_url(url).ping()
        pid = home_redis(bare_home / "run").alive().pid
        status = run(capsys, "redis", "status")
        assert status.code == 0
        assert status.out.strip() == f"running pid={pid} address={url}"
        assert run(capsys, "redis", "start").out.strip() == url  # already running: the same
        stopped = run(capsys, "redis", "stop")
        assert stopped.code == 0 and stopped.out.strip() == "stopped"
        assert run(capsys, "redis", "status").out.strip() == "not running"
        assert run(capsys, "redis", "stop").out.strip() == "not running"
    finally:
        main(["redis", "stop"])


def test_redis_status_without_a_server_says_not_running(
        bare_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run(capsys, "redis", "status")
    assert result.code == 0 and result.out.strip() == "not running"


@pytest.mark.parametrize("action", ["start", "stop", "status"])
def test_redis_with_a_configured_url_is_refused(home: Home, action: str) -> None:
    result = home("redis", action)
    assert result.code == EXIT_USAGE
    assert "RECSTREAM_REDIS_URL is set" in result.line
