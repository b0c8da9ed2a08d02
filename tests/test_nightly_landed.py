"""The nightly trains on what the lander archived: `train --nightly --source landed`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streaming import bootstrap_champion, stream_env

from common.data.events import format_day
from common.data.synthetic import SyntheticConfig, generate
from common.data.wire import decode_event, encode_event
from common.infra.settings import load_settings
from common.model.registry import Registry
from recstream.cli import main
from stream.parts import write_part


def test_nightly_trains_on_the_landed_partition(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    env = stream_env(tmp_path, "127.0.0.1:1", "unused")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(env)
    world = generate(SyntheticConfig())
    day_ms = int(world.day_start_ms[2])
    bootstrap_champion(settings, world.dataset, day_ms)
    day = world.dataset.events.between(day_ms, day_ms + 86_400_000).take(np.arange(2000))
    rows = [(decode_event(encode_event(r)), n) for n, r in enumerate(day.to_records())]
    write_part(settings.events_dir, format_day(day_ms), 0, rows[:1200])
    write_part(settings.events_dir, format_day(day_ms), 1, rows[1200:])
    assert main(["train", "--nightly", "--dataset", "synthetic", "--day", format_day(day_ms),
                 "--source", "landed"]) == 0
    result = json.loads(capsys.readouterr().out)
    meta = Registry(settings.models_dir).meta(result["version"])
    assert meta["source"] == "landed"
    # Recency sampling inside the one epoch keeps an example with prob 0.5^(age/20 d).
    assert 0.95 * len(day) <= meta["train"]["examples"] <= len(day)


def test_nightly_on_a_day_never_landed_fails_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    for key, value in stream_env(tmp_path, "127.0.0.1:1", "unused").items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--nightly", "--dataset", "synthetic", "--day", "2024-01-03",
                 "--source", "landed"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no landed events for 2024-01-03" in err
