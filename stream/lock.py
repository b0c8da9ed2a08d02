"""One trainer per home: an exclusive lock on its checkpoint directory, held while it runs.

Two trainers on one ``RECSTREAM_HOME`` would overwrite each other's checkpoints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO


class TrainerLockedError(RuntimeError):
    """Another trainer process already owns this home's checkpoints."""


def exclusive_lock(ckpt_dir: Path) -> TextIO:
    """Take the directory's lock (and record our pid in it); close the file to release."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fh = open(ckpt_dir / ".lock", "a+")  # noqa: SIM115 - held until the caller closes it
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise TrainerLockedError(f"another stream trainer (pid {holder}) holds {ckpt_dir}; "
                                 "run one trainer per RECSTREAM_HOME") from None
    fh.truncate(0)
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
