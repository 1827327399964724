"""Keep native libraries' prints off stdout: fd 1 goes to fd 2 while they run.

The QNN stack writes a ``# LIBNATIVE: ...`` banner to file descriptor 1 from native code when its
backend first initializes, which would corrupt output that must be only JSON (``--json``).
``sys.stdout`` redirection cannot catch that, so this works at the file-descriptor level.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

__all__ = ["native_stdout_to_stderr"]

# fd 1 is process-wide: the first caller to enter saves and redirects it, the last one to leave
# restores it, so nested and concurrent uses never restore a redirected fd as the "real" one.
_lock = threading.Lock()
_depth = 0
_saved: int | None = None


def _flush_all() -> None:
    """Flush Python's sys.stdout and C stdio, so buffered bytes land where fd 1 points now."""
    with contextlib.suppress(Exception):
        if sys.stdout is not None:
            sys.stdout.flush()
    # A native library printing through C stdio to a pipe is block-buffered: without this, its
    # bytes would be written out later, after fd 1 is restored, i.e. onto stdout after all.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to fd 2 for the duration of the block; restored afterwards, also on error."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _flush_all()
            try:
                saved = os.dup(1)
            except OSError:  # no fd 1 at all: nothing to protect
                saved = None
            if saved is not None:
                try:
                    os.dup2(2, 1)
                except OSError:  # no fd 2: leave stdout as it is
                    os.close(saved)
                    saved = None
            _saved = saved
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                _flush_all()
                os.dup2(_saved, 1)
                os.close(_saved)
                _saved = None
