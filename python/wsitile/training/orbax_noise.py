"""Quiet around orbax's saves and restores: what orbax and TensorStore print from their own threads
when one fails (a full disk, a damaged checkpoint) besides the exception it raises, which wsitile
reports in one line. A failed save printed ~9,000 lines around the CLI's one for a width-0.125 model."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings
from typing import Any, Iterator


def _closed_loop_callback(unraisable: Any) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _closed_loop_callbacks_dropped() -> Any:
    """Makes the process's unraisable-exception hook drop RuntimeError("Event loop is closed") (and
    only that; everything else goes to the hook it had); returns the hook it had.

    When a save (or restore) fails, orbax closes its event loop while TensorStore writes are still in
    flight; each of their callbacks into the closed loop is an unraisable exception, printed as a
    headerless traceback: ~1,400 of them for a width-0.125 model, from the first failed write until
    after the error has been raised."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return previous  # left by an earlier failure

    def hook(unraisable: Any) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    return previous


def _not_an_abandoned_write(record: logging.LogRecord) -> bool:
    """False for asyncio's "exception was never retrieved" about a write into an orbax temporary
    folder (a failed save's other writes) or a read of a checkpoint's OCDBT database (a failed
    restore's other reads: a damaged checkpoint), logged when their futures are collected (at exit;
    in CI once in four runs of test_damaged_checkpoint_says_so, after its one-line error)."""
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and (".orbax-checkpoint-tmp" in message or "in OCDBT database at" in message))


def _not_a_writer_thread_failure(record: logging.LogRecord) -> bool:
    """False for orbax's log of an exception in one of its threads: every such exception is also
    raised by the save or restore, which wsitile never swallows."""
    return "_SignalingThread.run() raised an exception" not in record.getMessage()


def _quiet_after_a_failed_checkpoint() -> None:
    """A failed save leaves orbax's and TensorStore's writes running on after its error is raised,
    and each reports its own failure as it ends or is collected (up to the process's exit): those
    reports are dropped from then on, as the closed event loop's callbacks are."""
    absl, asyncio = logging.getLogger("absl"), logging.getLogger("asyncio")
    if _not_a_writer_thread_failure not in absl.filters:
        absl.addFilter(_not_a_writer_thread_failure)
        asyncio.addFilter(_not_an_abandoned_write)
        # orbax's serialisation coroutines (write_fragment, _write_metadata_after_commits, ...):
        # named, so that the user's own un-awaited coroutines still warn.
        warnings.filterwarnings("ignore", r"coroutine '[^']*(write|serializ|commit)[^']*' was never awaited",
                                RuntimeWarning)


class _HeldErrors(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.records.append(record)
        return False


# Overlapping blocks (threads saving or restoring at once) share one held list and one hook: set up
# by the first to enter, settled by the last to leave.
_lock = threading.Lock()
_depth = 0
_held = _HeldErrors()
_previous_hook: Any = None
_any_failed = False


@contextlib.contextmanager
def orbax_noise_held() -> Iterator[None]:
    """orbax logs each of its worker threads' exceptions, traceback and all, on absl's logger before
    the save or restore raises the first of them: a full disk printed ~140 lines around the CLI's one.
    They are held while the block runs: dropped if it raises an error (its exception says it), passed
    on if it succeeds (an error orbax logged and recovered from) or is interrupted (Ctrl-C). The
    closed event loop's callbacks are dropped from the block's start, and after it for good if it
    fails. Blocks that overlap settle together when the last one ends: the held logs go if any failed."""
    global _depth, _held, _previous_hook, _any_failed
    absl = logging.getLogger("absl")
    with _lock:
        if _depth == 0:
            _held, _any_failed = _HeldErrors(), False
            absl.addFilter(_held)
            _previous_hook = _closed_loop_callbacks_dropped()
        _depth += 1
    failed = False
    try:
        yield
    except Exception:
        failed = True
        raise
    finally:
        with _lock:
            if failed:
                _any_failed = True
                _quiet_after_a_failed_checkpoint()  # the hook stays too: the callbacks outlive the call
            _depth -= 1
            last, replay = _depth == 0, []
            if last:
                absl.removeFilter(_held)
                if not _any_failed:
                    sys.unraisablehook = _previous_hook
                    replay = _held.records
        for record in replay:
            absl.handle(record)
