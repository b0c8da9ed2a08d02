"""The demo's offline freshness curve: ``batch.freshness.freshness_curve`` on the days the
demo replays, in a process of its own while the lockstep replay runs.

The replay is latency-bound (score a window, produce it, wait for the trainer to
publish and commit it), so on two cores one core is mostly idle during it; the curve
runs there instead of after it. It starts from the demo's own bootstrap (the registry
version), so both measure the same model on the same days; its data set is cut after
the last replayed day, which makes those days its test window.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.data.events import DAY_MS
from common.infra.atomic import write_text_atomic

JOIN_S = 900.0  # a curve that has not finished by then failed; the demo does not hang


class CurveError(RuntimeError):
    """The offline curve's process failed or did not finish."""


class OfflineCurve:
    """The curve's process and where it writes its report (JSON)."""

    def __init__(self, env: dict[str, str], dataset_name: str, base_version: str,
                 start_ms: int, days: int, delays_s: Sequence[int], models: Sequence[str],
                 out: Path) -> None:
        self.out = out
        ctx = multiprocessing.get_context("spawn")  # no forked copy of the demo's clients
        self.proc = ctx.Process(target=_main, name="recstream-demo-curve", daemon=True,
                                args=(env, dataset_name, base_version, start_ms, days,
                                      list(delays_s), list(models), str(out)))

    def start(self) -> OfflineCurve:
        self.out.unlink(missing_ok=True)
        self.proc.start()
        return self

    def result(self, timeout_s: float = JOIN_S) -> dict[str, Any]:
        """Wait for the process and return its report (``freshness_curve``'s, plus
        ``seconds_total``: the process's wall time including its set-up)."""
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.stop()
            raise CurveError(f"the offline freshness curve did not finish within {timeout_s:.0f} s")
        if self.proc.exitcode != 0 or not self.out.exists():
            raise CurveError(f"the offline freshness curve exited with status "
                             f"{self.proc.exitcode} (its traceback is on stderr above)")
        report: dict[str, Any] = json.loads(self.out.read_text())
        return report

    def stop(self) -> None:
        """End the process if it still runs (this process's own child, by handle)."""
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)


def _main(env: dict[str, str], dataset_name: str, base_version: str, start_ms: int,
          days: int, delays_s: list[int], models: list[str], out: str) -> None:
    started = time.perf_counter()
    import torch

    from batch.freshness import freshness_curve
    from common.data.datasets import load_dataset
    from common.infra.settings import load_settings
    from common.model.registry import Registry

    torch.set_num_threads(1)  # the other core is the replay's
    settings = load_settings(env)
    dataset = load_dataset(dataset_name, settings.data_cache)
    cut = dataclasses.replace(dataset,
                              events=dataset.events.between(None, start_ms + days * DAY_MS))
    # freshness_curve's test window is the last ``test_days`` days of the data it gets.
    test_days = int(cut.events.ts_ms.max()) // DAY_MS + 1 - start_ms // DAY_MS
    base, _ = Registry(settings.models_dir).load(base_version)
    report = freshness_curve(settings, cut, test_days, delays_s, models, base=base)
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    write_text_atomic(Path(out), json.dumps(report))
