"""Run a smoa_mlx command with a fault armed: ``python tests/faults/inject.py MODULE ARGS...``.

The fault is chosen by environment variables, so the command itself runs unmodified (``runpy``, as ``python -m``):

* ``FAULT_KILL_AT=N`` and ``FAULT_KILL_WHEN=before|partial|after``: SIGKILL this process at the N-th file rename
  (``os.replace`` / ``os.rename``: the commit point of every atomic write). ``before`` dies with the temporary file
  complete but not renamed, ``partial`` first truncates the temporary file to a random length (a kill in the middle
  of writing it), ``after`` dies right after the rename (the next file of the same save not yet written).
* ``FAULT_COUNT=FILE``: kill nothing; append one line per rename (source and target) to FILE, to learn how many
  renames a run makes and where.

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
    real = {"replace": os.replace, "rename": os.rename}

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


if __name__ == "__main__":
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    _arm()
    runpy.run_module(module, run_name="__main__", alter_sys=True)
