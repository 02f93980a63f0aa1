"""Shared helpers for tests that run configs and the command line."""
import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".jax_cache")


def jit_init(module, *args, **kwargs):
    """``module.init(*args, **kwargs)`` as one compiled program (keyword arguments static):
    several times faster than flax's op-by-op init for a whole network."""
    import functools

    import jax
    return jax.jit(functools.partial(module.init, **kwargs))(*args)


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process the tests start: none of the developer's (e.g. a forced device
    count), or ``devices`` forced CPU devices."""
    return f"--xla_force_host_platform_device_count={devices}" if devices else ""


def load_config_module(path: str):
    """Imports a config file (e.g. ``configs/demo.py``) as a module."""
    full = os.path.join(REPO, path)
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(name: str):
    """Imports a script of ``experiments/`` (e.g. ``bench_step``) as a module."""
    path = os.path.join(REPO, "experiments", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def override(c, **overrides):
    """Sets config fields named ``section__field`` (``__`` for the dots); returns ``c``."""
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def demo_config(variant=None, **overrides):
    return override(load_config_module("configs/demo.py").get_config(variant), **overrides)


def short_run(max_steps: int, every: int = 2, **overrides):
    """``configs/demo.py:smoke`` cut to ``max_steps`` steps, logging and saving every ``every``
    steps, compiling on demand (the fewest programs)."""
    c = demo_config("smoke", **overrides)
    c.train.max_steps = max_steps
    c.train.checkpoint_every_steps = every
    c.train.log_every_steps = every
    c.train.compile_ahead = False
    return c


# The single-width baselines (SEED, SEED-MSE, MoCo v2) at test size.
TINY_BASELINE = dict(model__base_width=16, heads__proj_hidden=32, heads__head_hidden=32,
                     heads__proj_out=16, data__image_size=8, optim__batch_size=32,
                     method__group_size=16, train__log_every_steps=2,
                     train__compile_ahead=False, eval__final_sweep=False)


def tiny_baseline(variant, **overrides):
    """``configs/demo.py:<variant>`` at test size, queues of 64 keys."""
    c = demo_config(variant, **{**TINY_BASELINE, **overrides})
    if c.method.queue_size:
        c.method.queue_size = 64
    return c


def leaves_equal(a, b) -> bool:
    """Same tree size and bitwise-equal leaves."""
    import jax
    import numpy as np
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def run_main(config: str, workdir: str, *flags: str, wait: bool = True, timeout: int = 600,
             module: str = "us3l_jax.main", env: dict | None = None, prefix: tuple = ()):
    """Runs ``python -m us3l_jax.main`` as a user would; stdout and stderr merged. ``prefix``
    goes before the interpreter (e.g. ``setpriv ... --``)."""
    cmd = [*prefix, sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
           f"--config.train.compilation_cache_dir={CACHE}", *flags]
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=xla_flags())
    full_env.update(env or {})
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
