"""Errors the user can fix, which the command lines report as one line with exit status 2.

Any other exception, a ``ValueError`` from inside the library included, is a bug or a fault of
the machine and keeps its traceback. The user-facing errors are this module's ``UsageError``
and the errors of the layers that check what the user gave: ``config.ConfigError``,
``data.datasets.DatasetNotFoundError``, ``checkpointing.CheckpointError`` and
``workdir_lock.WorkdirLockedError``.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A command line, config value or input the user gave that cannot run (e.g.
    ``--coordinator_address`` without ``--num_processes``, a batch size that does not split
    over the devices); its message says what to change."""
