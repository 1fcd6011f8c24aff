"""Run a smoa_mlx command with a fault armed: ``python tests/faults/inject.py MODULE ARGS...``.

The fault is chosen by environment variables, so the command itself runs unmodified (``runpy``, as ``python -m``):

* ``FAULT_KILL_AT=N`` and ``FAULT_KILL_WHEN=before|partial|after``: SIGKILL this process at the N-th file rename
  (``os.replace`` / ``os.rename``: the commit point of every atomic write). ``before`` dies with the temporary file
  complete but not renamed, ``partial`` first truncates the temporary file to a random length (a kill in the middle
  of writing it), ``after`` dies right after the rename (the next file of the same save not yet written).
* ``FAULT_COUNT=FILE``: kill nothing; append one line per rename (source and target) to FILE, to learn how many
  renames a run makes and where.
* The atomic swap of two folders (``smoa_mlx.atomic.exchange``: a folder replaced whole) counts as one rename.
  ``FAULT_NO_EXCHANGE=1`` makes it unavailable, as on a file system without one: the folder is then replaced by
  two renames, and ``FAULT_KILL_AT`` can stop the writer between them.

SIGKILL cannot be caught: what is on disk afterwards is exactly what a power cut or the OOM killer would leave.
"""

from __future__ import annotations

import os
import random
import runpy
import signal
import sys


def _arm() -> None:
    kill_at = int(os.environ.get("FAULT_KILL_AT", "0"))
    when = os.environ.get("FAULT_KILL_WHEN", "before")
    count_file = os.environ.get("FAULT_COUNT")
    seen = [0]
    import smoa_mlx.atomic as atomic

    real = {"replace": os.replace, "rename": os.rename, "exchange": atomic.exchange}

    def wrap(name):
        def renamed(src, dst, *args, **kwargs):
            seen[0] += 1
            if count_file:
                with open(count_file, "a") as f:
                    f.write(f"{seen[0]}\t{src}\t{dst}\n")
            hit = seen[0] == kill_at
            if hit and when == "partial" and os.path.isfile(src):
                size = os.path.getsize(src)
                os.truncate(src, random.Random(kill_at).randrange(size) if size else 0)
            if hit and when in ("before", "partial"):
                os.kill(os.getpid(), signal.SIGKILL)
            result = real[name](src, dst, *args, **kwargs)
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return renamed

    os.replace, os.rename = wrap("replace"), wrap("rename")
    atomic.exchange = (lambda a, b: False) if os.environ.get("FAULT_NO_EXCHANGE") else wrap("exchange")


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    _arm()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
