"""Packaging: compatible ranges in setup.py, the exact tested set in requirements.lock, and an
install next to a preinstalled in-range JAX (Colab, a TPU VM) that leaves that JAX in place.

The install checks are pip's own resolver, offline: ``pip install --dry-run --no-index
--report`` of a wheel that carries exactly the metadata setup.py declares, into a fresh venv
that sees this environment's packages and a preinstalled ``jax``/``jaxlib`` of a version we
choose (metadata only)."""
import json
import os
import runpy
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from unittest import mock

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import REPO


def setup_kwargs() -> dict:
    """The arguments setup.py passes to ``setuptools.setup``."""
    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
        runpy.run_path(os.path.join(REPO, "setup.py"))
    return captured


SETUP = setup_kwargs()


def lock() -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(REPO, "requirements.lock")):
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[Requirement(name).name.lower().replace("_", "-")] = version
    return pins


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


# Ranges that reach past the locked version's minor, each to releases verified on Python 3.12
# (docs/launch.md, "Verified versions"): name -> (floor, ceiling). JAX 0.11+ needs Python 3.12,
# so the Python 3.11 lock keeps 0.10.2; orbax-checkpoint 0.12.4 is a GPU image's version.
WIDENED = {"jax": ("0.10.2", "0.13"), "jaxlib": ("0.10.2", "0.13"),
           "numpy": ("2.4.6", "2.6"), "orbax-checkpoint": ("0.12.4", "0.13")}


def test_ranges_are_floor_tested_ceiling_next_minor():
    pins = lock()
    reqs = [Requirement(r) for r in SETUP["install_requires"] + SETUP["extras_require"]["test"]]
    for r in reqs:
        if _canonical(r.name) == _canonical(SETUP["name"]):
            continue  # an extra of our own (e.g. "us3l_jax[export]" in the test extra)
        floor = next(s.version for s in r.specifier if s.operator == ">=")
        ceiling = next(s.version for s in r.specifier if s.operator == "<")
        pin = pins[_canonical(r.name)]
        if _canonical(r.name) in WIDENED:
            assert (floor, ceiling) == WIDENED[_canonical(r.name)], r
            assert Version(floor) <= Version(pin) < Version(ceiling), r
            continue
        major, minor = Version(floor).release[:2]
        assert ceiling == f"{major}.{minor + 1}", r  # below the next minor
        # The lock pins exactly the floor: the floor is the version we test.
        assert pin == floor, r
    jax = next(r for r in reqs if r.name == "jax")
    extras = SETUP["extras_require"]
    for extra in ("cuda12", "cuda13", "tpu"):  # the accelerator builds, in JAX's range
        assert [Requirement(r) for r in extras[extra]] == \
            [Requirement(f"jax[{extra}]{jax.specifier}")], extra
    assert [Requirement(r).name for r in extras["prepare"]] == ["tensorflow",
                                                                "importlib-resources"]


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI installs with -c requirements.lock")
def test_lock_is_consistent_with_this_environment():
    """Every locked version is what CI's environment runs."""
    mismatched = {n: (v, metadata.version(n)) for n, v in lock().items()
                  if metadata.version(n) != v}
    assert not mismatched


def _metadata_wheel(directory: str) -> str:
    """A wheel of us3l_jax with setup.py's dependency metadata and no files (pip resolves a
    wheel from its METADATA; building the real one needs the ``wheel`` package). A local
    version label keeps pip from taking an installed us3l_jax for it."""
    name, version = SETUP["name"], SETUP["version"] + "+metadata"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             f"Requires-Python: {SETUP['python_requires']}"]
    lines += [f"Requires-Dist: {r}" for r in SETUP["install_requires"]]
    for extra, reqs in SETUP["extras_require"].items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", "\n".join(lines) + "\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true"
                   "\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _venv_with_jax(directory: str, jax_version: str) -> str:
    """A venv that sees this environment's packages but has ``jax``/``jaxlib`` at
    ``jax_version`` preinstalled (first on its path); returns its python."""
    venv = os.path.join(directory, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with open(os.path.join(site, "parent.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    for dist in ("jax", "jaxlib"):
        info = os.path.join(site, f"{dist}-{jax_version}.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {jax_version}\n")
        for name, text in (("INSTALLER", "pip\n"), ("RECORD", "")):
            with open(os.path.join(info, name), "w") as f:
                f.write(text)
    return python


def _dry_run(tmp_path, jax_version: str, extra: str = ""):
    python = _venv_with_jax(str(tmp_path), jax_version)
    wheel = _metadata_wheel(str(tmp_path))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                           "--dry-run", "--no-index", "--quiet", "--report", str(report),
                           wheel + extra], capture_output=True, text=True,
                          env=dict(os.environ, PIP_NO_INPUT="1"))
    installs = None
    if proc.returncode == 0:
        installs = [(i["metadata"]["name"], i["metadata"]["version"])
                    for i in json.loads(report.read_text())["install"]]
    return proc, installs


# A later patch of this environment's JAX minor, as Colab or a TPU VM might have (the packages
# the venv sees, e.g. flax 0.12.12 needing JAX >= 0.11.1, accept it), and the newest verified
# minor (a CUDA 13 image).
_JAX = Version(metadata.version("jax"))


@pytest.mark.parametrize("version", [f"{_JAX.major}.{_JAX.minor}.9", "0.12.0"])
def test_install_leaves_a_preinstalled_in_range_jax_in_place(tmp_path, version):
    proc, installs = _dry_run(tmp_path, version)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert installs == [(SETUP["name"], SETUP["version"] + "+metadata")]  # that jax stays


@pytest.mark.parametrize("version", ["0.13.0", "0.10.1"])
def test_out_of_range_jax_is_not_accepted(tmp_path, version):
    """Outside the range pip must fetch another jax (offline here, so it stops saying so)."""
    proc, _ = _dry_run(tmp_path, version)
    assert proc.returncode != 0
    assert "No matching distribution found for jax<0.13,>=0.10.2" in proc.stderr, proc.stderr
