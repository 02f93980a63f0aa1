"""The cache of compiled programs: each (kind, channel configuration) compiles once, ahead of
time in background threads or at first call."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import jax


class Programs:
    """Jitted programs by key, each compiled once: ahead of time in background threads
    (``trace``) or at first call (``call``). XLA compiles without the GIL, so ahead-of-time
    compilation overlaps training."""

    def __init__(self, threads: int = 2):
        self._jitted: dict[Any, Any] = {}
        self._compiled: dict[Any, futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = futures.ThreadPoolExecutor(max_workers=threads,
                                                thread_name_prefix="us3l-compile")
        self.compile_seconds = 0.0
        self.compiled = 0
        self.seconds_by_key: dict[Any, float] = {}  # each program's own compile time

    def get(self, key, make: Callable[[], Any]):
        with self._lock:
            if key not in self._jitted:
                self._jitted[key] = make()
            return self._jitted[key]

    def call(self, key, make, *args):
        """Runs the program: its ahead-of-time executable if submitted (waiting for it), else
        the jitted function (compiling now)."""
        fut = self._compiled.get(key)
        if fut is not None:
            return fut.result()(*args)
        return self.get(key, make)(*args)

    def trace(self, key, make, *args):
        """Submits the program's compilation for these abstract arguments and returns its
        abstract outputs, so a dry run of the step reaches every later program."""
        fn = self.get(key, make)
        with self._lock:
            if key not in self._compiled:
                self._compiled[key] = self._pool.submit(self._compile, fn, args, key)
        return jax.eval_shape(fn, *args)

    def _compile(self, fn, args, key=None):
        t = time.perf_counter()
        compiled = fn.lower(*args).compile()
        with self._lock:
            seconds = time.perf_counter() - t
            self.compile_seconds += seconds
            self.seconds_by_key[key] = seconds
            self.compiled += 1
        return compiled

    def executable(self, key):
        """The compiled program of ``key`` (waiting for its ahead-of-time compilation)."""
        return self._compiled[key].result()

    def pending(self) -> list[futures.Future]:
        return list(self._compiled.values())

    def __len__(self) -> int:
        return len(self._jitted)

