"""The shared command-line pieces: the config list of ``--help`` and the configs a wheel ships."""
import ast
import os
import subprocess
import sys

import pytest

from us3l_jax import cli
from tests.helpers import REPO


def _summaries() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(REPO, "configs", name)) as f:
                doc = ast.get_docstring(ast.parse(f.read()))
            out[name] = " ".join(doc.split("\n\n")[0].split())
    return out


def test_help_lists_every_config_with_its_whole_summary_wrapped_to_the_terminal(monkeypatch):
    monkeypatch.chdir(REPO)
    text = cli.configs_help(columns=80)
    lines = text.splitlines()[1:]
    assert max(len(line) for line in lines) <= 80
    summaries = _summaries()
    # Each entry starts at its path; the wrapped lines after it, folded, are the summary.
    entries, current = {}, None
    for line in lines:
        if line.startswith("  configs/"):
            path, _, first = line.strip().partition(" ")
            current = os.path.basename(path)
            entries[current] = [first.strip()]
        else:
            entries[current].append(line.strip())
    assert {k: " ".join(v) for k, v in entries.items()} == summaries
    # A summary longer than one line was cut before (the docstring's first line only).
    assert any(len(v) > 1 for v in entries.values())


def test_config_files_reads_the_wheels_configs_when_there_is_no_checkout(tmp_path, monkeypatch):
    shipped = tmp_path / "site" / "us3l_jax" / "configs"
    shipped.mkdir(parents=True)
    (shipped / "demo.py").write_text('"""Demo: a\nsummary on two lines.\n\nMore."""\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_config_dirs", lambda: ["configs", str(tmp_path / "nowhere"),
                                                      str(shipped)])
    assert cli.config_files() == [(os.path.relpath(shipped / "demo.py"),
                                   "Demo: a summary on two lines.")]
    # --config=configs/<file> falls back to the shipped file, argument kept.
    assert cli.shipped_config("--config=configs/demo.py:smoke") == \
        f"--config={shipped / 'demo.py'}:smoke"
    assert cli.shipped_config("--config=configs/nothere.py") == "--config=configs/nothere.py"
    # An editable install's checkout comes before the wheel's copy.
    checkout = tmp_path / "checkout" / "configs"
    checkout.mkdir(parents=True)
    (checkout / "demo.py").write_text('"""Checkout."""\n')
    monkeypatch.setattr(cli, "_config_dirs", lambda: ["configs", str(checkout), str(shipped)])
    assert cli.shipped_config("--config=configs/demo.py") == f"--config={checkout / 'demo.py'}"
    monkeypatch.setattr(cli, "_config_dirs", lambda: ["configs", str(tmp_path / "nowhere"),
                                                      str(shipped)])
    assert cli.shipped_config("--workdir=configs/demo.py") == "--workdir=configs/demo.py"
    # A configs/ folder here wins over the shipped one.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.py").write_text('"""Local."""\n')
    assert cli.shipped_config("--config=configs/demo.py") == "--config=configs/demo.py"
    assert cli.config_files() == [(os.path.join("configs", "demo.py"), "Local.")]


@pytest.mark.slow
def test_an_installed_wheel_runs_the_readme_config_paths_from_any_directory(tmp_path):
    """Built and installed for real (no deps: this environment has them): from a directory
    without configs/, ``--help`` lists the wheel's configs and ``--config=configs/demo.py``
    loads the shipped file (an override of a missing field is checked against it)."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), REPO], check=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    py = str(venv / "bin" / "python")
    wheel = next(wheels.glob("us3l_jax-*.whl"))
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", COLUMNS="100")
    help_out = subprocess.run([py, "-m", "us3l_jax.main", "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)
    assert help_out.returncode == 0, help_out.stderr
    site = subprocess.run([py, "-c", "import us3l_jax, os; print(os.path.dirname("
                           "us3l_jax.__file__))"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert site.startswith(str(venv))
    assert "us3l_jax/configs/demo.py" in help_out.stdout
    bad = subprocess.run([py, "-m", "us3l_jax.main", "--config=configs/demo.py:smoke",
                          "--workdir=w", "--config.optim.bogus=1"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "optim has no field 'bogus'" in bad.stderr, bad.stderr
    assert not (elsewhere / "w").exists()
