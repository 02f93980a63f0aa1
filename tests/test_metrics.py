"""The metric sinks of a pretraining run (``us3l_jax.metrics``): JSON lines, TensorBoard and
Weights & Biases. W&B runs offline here (``WANDB_MODE=offline``): its transaction log
(``run-<id>.wandb``, a LevelDB-style log of protobuf records) is read back and compared with
``metrics.jsonl``."""
import errno
import glob
import json
import os
import signal
import sys

import pytest

from us3l_jax import config as config_lib, metrics, paths, pretrain
from tests.helpers import REPO, run_main, short_run


tiny = short_run  # 2 steps between logs and checkpoints


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, quiet, with every file it keeps under ``tmp_path``."""
    home = tmp_path / "wandb_home"
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
        os.makedirs(home / var.lower())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def wandb_records(path: str):
    """The records of a W&B transaction log: a 7-byte header (``:W&B``, a key, a version),
    then LevelDB log blocks of 32 KiB, each record a 7-byte header (checksum, length, kind:
    1 whole, 2 first, 3 middle, 4 last piece) and its bytes; a block's tail shorter than a
    header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    block, pos, pieces = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def offline_runs(workdir: str) -> list[dict]:
    """Each offline W&B session under ``<workdir>/wandb``, oldest first: its run id, config
    and history (``{step: {key: value}}``)."""
    out = []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb"))):
        run = {"history": {}}
        for r in wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"] = r.run.run_id
                run["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "history":
                run["history"][r.history.step.num] = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in r.history.item}
        out.append(run)
    return out


def jsonl(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_metric_writer_survives_io_errors_and_drops_steps_after_resume(tmp_path, caplog):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 4, 6):
        writer.write(step, {"loss": 1.0 / step})
    writer.truncate_after(4)
    writer.write(6, {"loss": 0.5})

    class Full:
        def write(self, _):
            raise OSError(errno.ENOSPC, "No space left on device")
        close = flush = lambda self: None
    writer._sinks[metrics.JSONL] = Full()
    with caplog.at_level("WARNING", logger="us3l"):
        writer.write(8, {"loss": 0.1})
        writer.write(10, {"loss": 0.1})
    writer.close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot write metrics.jsonl (OSError" in warnings[0]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 4, 6]


@pytest.mark.slow
def test_wandb_logs_the_losses_of_metrics_jsonl_and_a_resume_continues_its_run(
        tmp_path, offline_wandb):
    workdir = str(tmp_path / "run")
    config = tiny(4, train__wandb_project="us3l-test")
    pretrain.train(config, workdir)
    with open(os.path.join(workdir, metrics.WANDB_ID_FILE)) as f:
        run_id = f.read().strip()
    (first,) = offline_runs(workdir)
    assert first["id"] == run_id
    assert {k: v for k, v in first["config"].items() if k != "_wandb"} == \
        config_lib.flatten(config)
    records = jsonl(workdir)
    assert [r["step"] for r in records] == [1, 2, 4] == sorted(first["history"])
    for r in records:
        logged = first["history"][r["step"]]
        assert logged["loss/total"] == r["loss/total"] and logged["epoch"] == r["epoch"]
        assert "widths" not in logged  # lists stay in metrics.jsonl

    # Resuming (with another run name: a logging setting, accepted without
    # --allow_config_change) continues the same W&B run from the checkpoint's step.
    pretrain.train(tiny(6, train__wandb_project="us3l-test", train__wandb_name="second"),
                   workdir)
    first_again, second = offline_runs(workdir)
    assert first_again == first and second["id"] == run_id
    records = jsonl(workdir)
    assert [r["step"] for r in records] == [1, 2, 4, 5, 6]
    assert sorted(second["history"]) == [5, 6]
    assert [second["history"][s]["loss/total"] for s in (5, 6)] == \
        [r["loss/total"] for r in records[3:]]

    # A rerun of the finished run has nothing to do and starts no W&B run.
    pretrain.train(tiny(6, train__wandb_project="us3l-test"), workdir)
    assert len(offline_runs(workdir)) == 2


def test_a_failing_wandb_log_is_one_warning_and_training_completes(
        tmp_path, offline_wandb, monkeypatch, caplog):
    import wandb

    def broken(self, *args, **kwargs):
        raise ConnectionError("W&B is unreachable\nsecond line")
    monkeypatch.setattr(wandb.Run, "log", broken)
    workdir = str(tmp_path / "run")
    with caplog.at_level("WARNING", logger="us3l"):
        state = pretrain.train(tiny(4, train__wandb_project="us3l-test"), workdir)
    assert int(state.step) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["cannot write W&B (ConnectionError: W&B is unreachable); no more W&B "
                        "for this run"]
    assert [r["step"] for r in jsonl(workdir)] == [1, 2, 4]  # the other sinks go on
    (run,) = offline_runs(workdir)
    assert run["history"] == {}


class FakeRun:
    def __init__(self, starting_step):
        self.starting_step, self.logged, self.exit_code = starting_step, [], None
        self.events = []

    def mark_preempting(self):
        self.events.append("preempting")

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self, exit_code=0):
        self.exit_code = exit_code
        self.events.append(f"finish {exit_code}")


def test_a_resumed_wandb_run_gets_only_the_steps_it_lacks(tmp_path, monkeypatch):
    """Online, W&B resumes after the last step it holds (``starting_step``); the steps
    between the checkpoint and the interruption are not sent again."""
    import wandb
    fake, calls = FakeRun(starting_step=7), []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or fake)
    (tmp_path / metrics.WANDB_ID_FILE).write_text("abc123\n")
    spec = metrics.WandbRun(project="p", entity="e", name="n", config={"a.b": 1})
    writer = metrics.MetricWriter(str(tmp_path), resume_step=4, wandb_run=spec)
    for step in (5, 6, 7, 8):
        writer.write(step, {"loss": float(step), "widths": [1.0, 0.5]})
    writer.close(143, preempted=True)  # SIGTERM: W&B hears "preempting" before the exit code
    assert fake.events == ["preempting", "finish 143"]
    assert calls == [dict(project="p", entity="e", name="n", id="abc123", resume="allow",
                          config={"a.b": 1}, dir=str(tmp_path))]
    assert fake.logged == [(7, {"loss": 7.0}), (8, {"loss": 8.0})]
    assert fake.exit_code == 143

    # A new run (no checkpoint to resume) starts a new W&B run and records its id.
    writer = metrics.MetricWriter(str(tmp_path), resume_step=None, wandb_run=spec)
    writer.close()
    new_id = (tmp_path / metrics.WANDB_ID_FILE).read_text().strip()
    assert new_id != "abc123" and calls[-1]["id"] == new_id


@pytest.mark.slow
@pytest.mark.parametrize("signum, events", [
    (signal.SIGTERM, ["preempting", "finish 143"]),  # requeued by a W&B sweep, not failed
    (signal.SIGINT, ["finish 130"]),  # the user stopped it
])
def test_a_run_stopped_by_a_signal_tells_wandb_why(tmp_path, monkeypatch, signum, events):
    """Training saves and stops on SIGTERM (preemption) or Ctrl-C; W&B hears "preempting"
    only for the first, then the exit status the command line gives."""
    import wandb
    from us3l_jax import sampling
    fake = FakeRun(starting_step=0)
    monkeypatch.setattr(wandb, "init", lambda **kw: fake)
    sample, calls = sampling.sample_widths, []

    def signal_in_step_3(s, step, *args):
        calls.append(step)
        if step == 2 and calls.count(2) == 2:  # (the ETA's cost table draws it first)
            os.kill(os.getpid(), signum)
        return sample(s, step, *args)
    monkeypatch.setattr(pretrain.sampling, "sample_widths", signal_in_step_3)
    with pytest.raises(pretrain.Preempted) as e:
        pretrain.train(tiny(8, train__wandb_project="us3l-test"), str(tmp_path / "run"))
    assert e.value.exit_code == 128 + signum
    assert fake.events == events


def test_a_bucket_workdir_keeps_the_wandb_id_in_the_bucket_and_wandb_files_here(
        tmp_path, monkeypatch):
    """W&B writes its files with the ordinary file API: for a gs:// workdir they go to
    ``$WANDB_DIR`` (else the temporary folder); the run's id goes into the bucket, where the
    resume finds it."""
    import tempfile

    import wandb
    from tests import fake_gcs
    root = str(tmp_path / "fake_gcs")
    fake_gcs.make_bucket(root, "bucket")
    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kw: calls.append(kw) or FakeRun(0))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "local"))
    spec = metrics.WandbRun(project="p")
    with fake_gcs.install(root):
        metrics.MetricWriter("gs://bucket/run", None, spec).close()
        run_id = paths.read_text(f"gs://bucket/run/{metrics.WANDB_ID_FILE}").strip()
        metrics.MetricWriter("gs://bucket/run", 2, spec).close()
    assert [(c["id"], c["dir"]) for c in calls] == [(run_id, str(tmp_path / "local"))] * 2
    monkeypatch.delenv("WANDB_DIR")
    assert metrics.wandb_dir("gs://bucket/run") == tempfile.gettempdir()
    assert metrics.wandb_dir(str(tmp_path)) == str(tmp_path)


def test_wandb_settings_without_wandb_or_without_a_project_are_refused(monkeypatch):
    c = tiny(4, train__wandb_project="us3l-test")
    config_lib.validate(c)
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    assert str(e.value).startswith("config.train.wandb_project='us3l-test' logs to Weights & "
                                   "Biases, but wandb cannot be imported (")
    assert str(e.value).endswith(": pip install 'us3l_jax[wandb]'")
    c = tiny(4, train__wandb_entity="team")
    with pytest.raises(config_lib.ConfigError, match=r"^config.train.wandb_entity='team' needs "
                       r"config.train.wandb_project \(empty: W&B is off\)$"):
        config_lib.validate(c)


def test_the_command_line_without_wandb_is_one_line_exit_2(tmp_path):
    hide = tmp_path / "no_wandb"
    os.makedirs(hide / "wandb")
    (hide / "wandb" / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    workdir = tmp_path / "run"
    out = run_main("configs/demo.py:smoke", str(workdir), "--config.train.wandb_project=p",
                   env={"PYTHONPATH": f"{hide}{os.pathsep}{REPO}"})
    assert out.returncode == 2, out.stdout[-2000:]
    assert out.stdout.strip().splitlines() == [
        "error: config.train.wandb_project='p' logs to Weights & Biases, but wandb cannot be "
        "imported (No module named 'wandb'): pip install 'us3l_jax[wandb]'"]
    assert not os.path.exists(workdir)
