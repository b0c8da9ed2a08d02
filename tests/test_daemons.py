"""recstream.daemons: a daemon's stop reports the exit status it really had."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from recstream.daemons import Daemon

_EXITS_3_ON_SIGTERM = ("import signal, sys, time\n"
                       "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
                       "print('ready', flush=True)\n"
                       "time.sleep(60)\n")


def test_stop_returns_the_status_the_process_exited_with(tmp_path: Path) -> None:
    daemon = Daemon("probe", ["--help"], {}, tmp_path, "RECSTREAM_STREAM_TRAINER_METRICS_PORT")
    daemon.proc = subprocess.Popen([sys.executable, "-c", _EXITS_3_ON_SIGTERM],
                                   stdout=subprocess.PIPE)
    assert daemon.proc.stdout is not None and daemon.proc.stdout.readline() == b"ready\n"
    started = time.monotonic()
    assert daemon.stop(timeout_s=30) == 3  # not 0: a failed shutdown must show
    assert time.monotonic() - started < 30 and not daemon.alive()
