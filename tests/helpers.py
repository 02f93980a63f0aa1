"""Shared helpers for tests that run configs and the command line."""
import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".jax_cache")


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


def demo_config(variant=None, **overrides):
    c = load_config_module("configs/demo.py").get_config(variant)
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def run_main(config: str, workdir: str, *flags: str, wait: bool = True, timeout: int = 600,
             module: str = "us3l_jax.main", env: dict | None = None):
    """Runs ``python -m us3l_jax.main`` as a user would; stdout and stderr merged."""
    cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
           f"--config.train.compilation_cache_dir={CACHE}", *flags]
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    full_env.pop("XLA_FLAGS", None)
    full_env.update(env or {})
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
