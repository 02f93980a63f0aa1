"""notebooks/quickstart.ipynb, executed end to end on CPU as a user would run it (with the
demo's ``:smoke`` variant cut to 2 epochs), and stored without outputs."""
import json
import os

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
