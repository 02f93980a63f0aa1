"""Errors the user can fix, which the command lines report as one line with exit status 2.

Any other exception, a ``ValueError`` from inside the library included, is a bug or a fault of
the machine and keeps its traceback. The user-facing errors are this module's ``UsageError``
and the errors of the layers that check what the user gave: ``config.ConfigError``,
``data.datasets.DatasetNotFoundError``, ``checkpointing.CheckpointError`` and
``workdir_lock.WorkdirLockedError``.

It also holds the command lines' Ctrl-C handling (below), which must be installed before
anything heavy is imported and is consulted by the pretraining loop's setup.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A command line, config value or input the user gave that cannot run (e.g.
    ``--coordinator_address`` without ``--num_processes``, a batch size that does not split
    over the devices); its message says what to change."""


# Ctrl-C from the first line of a command on (exit status 130, one line). Until the command
# starts its work (imports, flag parsing, loading the config) nothing has been written, so
# the handler prints the line and exits at once. From ``interrupts_raise()`` on it raises
# ``KeyboardInterrupt`` like Python's own handler, for the command to clean up and report,
# except inside JAX's garbage-collection hook, where Python would print and swallow it (the
# run then went on): there it only notes the interrupt and delivers the signal again a
# moment later. ``raise_if_interrupted`` also stops a run at the next stage of its setup.
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT
_state = {"raise": False, "interrupted": False, "message": ""}


def _on_sigint(signum, frame) -> None:
    import os
    import sys
    _state["interrupted"] = True
    if not _state["raise"]:
        try:
            sys.stdout.flush()
            print(f"error: {_state['message']}", file=sys.stderr, flush=True)
        finally:
            os._exit(INTERRUPTED_EXIT_CODE)
    f = frame
    while f is not None:
        if f.f_code.co_name == "_xla_gc_callback":  # a gc callback swallows exceptions
            import threading
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def catch_interrupts(message: str = "interrupted (Ctrl-C) before anything was written") -> None:
    """Installs the SIGINT handler above in exit-at-once mode (call from the main thread, as
    early as the command can); ``message`` is the line it prints."""
    import signal
    _state.update({"raise": False, "message": message})
    signal.signal(signal.SIGINT, _on_sigint)


def interrupts_raise() -> None:
    """From now on a Ctrl-C raises ``KeyboardInterrupt`` (the command starts writing)."""
    _state["raise"] = True


def raise_if_interrupted() -> None:
    """Raises ``KeyboardInterrupt`` if a Ctrl-C arrived and was not raised where it came."""
    if _state["interrupted"]:
        raise KeyboardInterrupt
