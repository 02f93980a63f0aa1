"""notebooks/quickstart.ipynb: its install cell (checkout, wheel, archive, GPU extra), and the
notebook executed end to end on CPU as a user would run it (with the
demo's ``:smoke`` variant cut to 2 epochs), and stored without outputs."""
import json
import os
import shutil

import nbformat
import pytest

from tests.helpers import CACHE, REPO

NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def test_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 5
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    text = open(NOTEBOOK).read()
    assert "OWNER" not in text and "git clone" not in text  # no placeholder repository


def install_cell():
    """The install cell's source, split where it starts acting (after its definitions)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = [c for c in nb.cells if c.cell_type == "code"][0].source
    cut = source.index("if os.path.basename(os.getcwd())")
    return source[:cut], source[cut:]


def run_install_cell(where, monkeypatch, source="", cuda=None):
    """Runs the install cell in ``where`` (Colab's working directory, or a checkout's
    notebooks/) with pip replaced by a recorder and, for ``cuda`` "12.4" etc., an
    ``nvidia-smi`` on the PATH that reports that version. Returns the cell's namespace and
    the pip arguments."""
    if cuda:
        bin_dir = where / "bin"
        bin_dir.mkdir(exist_ok=True)
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '| NVIDIA-SMI 580.1  Driver Version: 580.1  "
                       f"CUDA Version: {cuda}  |'\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    else:
        monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi of this machine's
    monkeypatch.setenv("US3L_SOURCE", source)
    monkeypatch.chdir(where)
    definitions, actions = install_cell()
    ns = {}
    exec(definitions, ns)
    installs = []
    ns["pip_install"] = installs.append
    exec(actions, ns)
    return ns, installs


def write_checkout(root):
    os.makedirs(root / "us3l_jax")
    (root / "setup.py").write_text("")
    (root / "configs").mkdir()


def test_install_cell_uses_a_wheel_an_archive_or_a_checkout(tmp_path, monkeypatch, capsys):
    """Without a checkout around it, the cell installs what it finds: a wheel (the configs
    are then the package's), an archive of a checkout (unpacked, installed editable), a
    folder named by US3L_SOURCE; with an NVIDIA driver it adds the CUDA extra."""
    import us3l_jax

    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    (wheel_dir / "us3l_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
    ns, installs = run_install_cell(wheel_dir, monkeypatch)
    assert installs == [[str(wheel_dir / "us3l_jax-0.1.0-py3-none-any.whl")]]
    assert ns["ROOT"] is None
    assert ns["CONFIGS"] == os.path.join(os.path.dirname(us3l_jax.__file__), "configs")

    archive_dir = tmp_path / "archive"
    write_checkout(archive_dir / "src" / "us3l_jax-main")  # GitHub's layout: one top folder
    shutil.make_archive(str(archive_dir / "us3l_jax"), "zip", archive_dir / "src")
    ns, installs = run_install_cell(archive_dir, monkeypatch, cuda="12.4")
    root = str(archive_dir / "us3l_jax_src" / "us3l_jax-main")
    assert installs == [["-e", root + "[cuda12]"]] and ns["ROOT"] == root == os.getcwd()
    assert ns["CONFIGS"] == "configs"
    assert "GPU runtime (driver for CUDA 12.4): installing with the [cuda12] extra" in \
        capsys.readouterr().out

    folder = tmp_path / "drive" / "checkout"
    write_checkout(folder)
    (tmp_path / "empty").mkdir()
    ns, installs = run_install_cell(tmp_path / "empty", monkeypatch, source=str(folder),
                                    cuda="13.0")
    assert installs == [["-e", str(folder) + "[cuda13]"]]

    with pytest.raises(FileNotFoundError, match="set US3L_SOURCE to a wheel"):
        run_install_cell(tmp_path / "empty", monkeypatch)


def test_install_cell_in_a_checkout_installs_nothing(monkeypatch):
    import pathlib
    ns, installs = run_install_cell(pathlib.Path(REPO, "notebooks"), monkeypatch)
    assert installs == [] and ns["ROOT"] == REPO and ns["CONFIGS"] == "configs"


@pytest.mark.slow
def test_runs_end_to_end(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    workdir = tmp_path / "run"
    monkeypatch.setenv("US3L_NOTEBOOK_CONFIG", "configs/demo.py:smoke")
    monkeypatch.setenv("US3L_NOTEBOOK_WORKDIR", str(workdir))
    # Half the smoke run (2 of its 4 epochs, so without the 4-stage schedule): the
    # notebook's path is the same, in less time.
    monkeypatch.setenv("US3L_NOTEBOOK_FLAGS",
                       "--config.optim.epochs=2 --config.sampler.schedule=none")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", REPO)
    # The run's default compile cache ($XDG_CACHE_HOME/us3l_jax/xla), kept beside the tests'.
    monkeypatch.setenv("XDG_CACHE_HOME", os.path.join(CACHE, "notebook"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [c.outputs for c in nb.cells if c.cell_type == "code"]
    text = lambda outs: "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert "jax 0." in text(outputs[0])
    assert "configs/demo.py:smoke" in text(outputs[1]) and "| 0.25 |" in text(outputs[1])
    sweep = json.load(open(workdir / "sweep.json"))
    assert [r["width"] for r in sweep] == [1.0, 0.25]
    # The sweep's table and plot, displayed inline.
    kinds = [k for o in outputs[2] if o.output_type == "display_data" for k in o.data]
    assert "text/markdown" in kinds and "image/png" in kinds
    # Another width, in its own folder; the run's sweep untouched.
    other = json.load(open(workdir / "eval" / "fast-0.375" / "sweep.json"))
    assert [(r["width"], r["protocol"]) for r in other] == [(0.375, "fast")]
    assert f"width 0.375: {other[0]['accuracy']:.1f}% top-1 (fast)" in text(outputs[3])
    assert json.load(open(workdir / "sweep.json")) == sweep
    export = text(outputs[4])
    assert "'model.msgpack'" in export and "'model_card.json'" in export, export
    card = json.load(open(workdir / "export-0.5" / "model_card.json"))
    assert card["width"] == 0.5
