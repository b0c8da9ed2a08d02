"""The recstream command line: help, one-line errors, exit statuses."""

import subprocess
import sys
from pathlib import Path

import pytest

from recstream.cli import EXIT_FAILED, EXIT_USAGE, main


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recstream", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("args", [[], ["train"], ["eval"], ["data", "fetch"]])
def test_help_works_for_every_command(args: list[str]) -> None:
    result = _run(*args, "--help")
    assert result.returncode == 0
    assert "usage: recstream" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["train", "--nightly", "--day", "2024-13-01"], "invalid day '2024-13-01'"),
    (["train", "--bootstrap", "--epochs", "0"], "expected a positive integer"),
    (["eval", "--test-days", "many"], "expected a positive integer"),
    (["train"], "one of the arguments --bootstrap --nightly is required"),
    (["frobnicate"], "invalid choice"),
    (["eval", "--dataset", "netflix"], "invalid choice"),
])
def test_bad_argument_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                             args: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_USAGE
    assert expected in err
    assert len(err.strip().splitlines()) == 1


def test_nightly_without_day_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path))
    assert main(["train", "--nightly", "--dataset", "synthetic"]) == EXIT_USAGE
    assert "--nightly needs --day" in capsys.readouterr().err


def test_bad_setting_fails_with_the_variable_name(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_TRAIN_BATCH_SIZE", "huge")
    assert main(["eval", "--dataset", "synthetic"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "RECSTREAM_TRAIN_BATCH_SIZE='huge'" in err and len(err.strip().splitlines()) == 1


def test_nightly_without_champion_fails_cleanly(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path))
    code = main(["train", "--nightly", "--day", "2024-01-05", "--dataset", "synthetic"])
    assert code == EXIT_FAILED
    assert "alias 'champion' is not set" in capsys.readouterr().err


def test_bootstrap_then_nightly_through_the_cli(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from common.model.registry import Registry

    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path))
    assert main(["train", "--bootstrap", "--dataset", "synthetic", "--to", "2024-01-10",
                 "--epochs", "1"]) == 0
    boot = json.loads(capsys.readouterr().out)
    assert boot["promoted"] is True and boot["cutoff_day"] == "2024-01-09"
    assert main(["train", "--nightly", "--dataset", "synthetic", "--day", "2024-01-10",
                 "--promote"]) == 0
    night = json.loads(capsys.readouterr().out)
    registry = Registry(tmp_path / "models")
    assert registry.aliases() == {"champion": night["version"], "previous": boot["version"]}
    assert registry.meta(night["version"])["parent"] == boot["version"]


def test_eval_writes_every_figure_as_json(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import json

    out = tmp_path / "eval.json"
    assert main(["eval", "--dataset", "synthetic", "--test-days", "2", "--models",
                 "popularity,item_knn", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"popularity", "item_knn"}
    assert 0.0 <= report["models"]["item_knn"]["recall@50"] <= 1.0
    assert "popularity" in capsys.readouterr().out


def test_eval_rejects_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--dataset", "synthetic", "--models", "magic"]) == EXIT_FAILED
    assert "unknown model 'magic'" in capsys.readouterr().err
