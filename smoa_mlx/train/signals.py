"""Ctrl-C, ``kill`` and a closed terminal stop a training run the same way: save, then exit 130 / 143 / 129.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the interpreter happens to be (in the middle of a report, a
save, a validation), while SIGTERM and SIGHUP kill the process without saving anything. :class:`StopSignals`
catches all three. Outside training they end the run at once (nothing to save yet). While training, the first one
is a request honoured at the next step boundary, where the step is complete and recorded: the runner saves a
resumable checkpoint there and raises :class:`Interrupted`. A second signal stops at once, without saving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``exit_code`` is what a shell reports for it (128 + the number)."""

    def __init__(self, signum: int, saved_step: Optional[int] = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved_step = saved_step

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Handlers for SIGINT / SIGTERM / SIGHUP for the duration of a ``with`` block (main thread only: elsewhere
    Python cannot install handlers, and the block does nothing)."""

    def __init__(self):
        self.pending: Optional[int] = None
        self.deferring = False
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> bool:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        if self.deferring and self.pending is None:
            self.pending = signum
            # os.write, not print: the signal may have interrupted a print to the same stream (a reentrant call)
            note = (f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                    "(send it again to stop at once, without saving)\n")
            try:
                os.write(2, note.encode())
            except OSError:
                pass
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: a first signal only sets :attr:`pending`; the loop calls :meth:`raise_pending` when it is safe."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False

    def raise_pending(self, saved_step: Optional[int] = None) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending, saved_step)
