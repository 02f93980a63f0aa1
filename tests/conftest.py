"""Test-wide setup: CPU only, float32 matmuls, and a persistent compilation cache so that
programs compiled by one test (or one test process) are reused by the next."""
import logging
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True)
def _root_logging_as_it_was():
    """A command's ``main(argv)`` called in a test installs a root handler on that test's
    captured stderr (``logging.basicConfig(force=True)``), which pytest closes afterwards: a
    later test in the same worker that logs (absl's flag parser does) would print a
    'Logging error' traceback into its own stderr. Such handlers go after each test, and the
    root level is put back (pytest's own capture handlers are subclasses, left alone)."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if type(h) is logging.StreamHandler and h not in before:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A frozen-teacher run for SEED tests: ``configs/demo.py:byol`` at test size, 3 steps."""
    from us3l_jax import pretrain
    from tests.helpers import tiny_baseline
    d = str(tmp_path_factory.mktemp("byol_teacher"))
    pretrain.train(tiny_baseline("byol", train__max_steps=3), d)
    return d


@pytest.fixture
def fake_calibrations(monkeypatch):
    """``Evaluator.calibrate`` replaced by a stand-in that compiles nothing: the n-th call
    returns full-size statistics of mean ``n`` and variance ``n + 1`` everywhere (so tests
    can tell whose statistics they got). Returns the list of ``(width, settings)`` calls."""
    import numpy as np

    from us3l_jax import calibration as calib
    from us3l_jax.evaluate.evaluator import Evaluator
    calls = []

    def calibrate(self, params, width, settings):
        calls.append((width, settings))
        n = float(len(calls))
        template = calib._full_size_template(self.backbone, (self.data.size,) * 2 + (3,))
        return jax.tree_util.tree_map_with_path(
            lambda path, s: np.full(s.shape, n if path[-1].key == "mean" else n + 1,
                                    np.float32), template)

    monkeypatch.setattr(Evaluator, "calibrate", calibrate)
    return calls
