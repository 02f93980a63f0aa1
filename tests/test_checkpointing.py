"""Checkpoint faults: corrupt checkpoints are caught (checksums), moved aside and resumed past;
a workdir with none readable is refused; changed configs are refused on resume; a failed
background save and Ctrl-C stop the run cleanly; metric writers never crash it.

One tiny run (6 steps, a checkpoint every 2) is trained once for the module; each test works
on a copy of it.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from us3l_jax import build, checkpointing, pretrain, sampling, workdir_lock
from tests.helpers import REPO, load_experiment, short_run

STEPS = 6


def tiny(max_steps=STEPS, **overrides):
    return short_run(max_steps, **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    state = pretrain.train(tiny(), workdir)
    return workdir, state


@pytest.fixture
def run_copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    return workdir


faults = load_experiment("fault_matrix")  # the CLI fault matrix's corruptions, in-process
CORRUPTIONS = {k: v for k, v in faults.CORRUPTIONS.items()
               if not k.startswith("unreadable")}  # (root reads files whatever their mode)
CORRUPTIONS["garbage checksum file"] = lambda d: open(
    os.path.join(d, checkpointing.CHECKSUM_FILE), "w").write("][")


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_latest_is_moved_aside_and_the_previous_restored(run_copy, name, caplog):
    ckpt_dir = os.path.join(run_copy, "checkpoints")
    CORRUPTIONS[name](os.path.join(ckpt_dir, "6"))
    ckpt = checkpointing.Checkpointer(run_copy, tiny())
    with caplog.at_level("WARNING"):
        step, state = ckpt.restore_latest(build.abstract_state(tiny()), move_corrupt=True)
    assert (step, int(state.step)) == (4, 4)
    assert ckpt.all_steps() == [2, 4]  # the manager no longer sees step 6
    ckpt.close()
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "corrupt-6"]
    assert "checkpoint 6" in caplog.text and "is corrupt" in caplog.text
    assert f"moved corrupt checkpoint 6 to {ckpt_dir}/corrupt-6" in caplog.text


def test_a_flipped_bit_anywhere_is_caught(trained):
    """Every file the checksums cover: one flipped bit makes verification fail."""
    step_dir = os.path.join(trained[0], "checkpoints", "2")
    listed = json.load(open(os.path.join(step_dir, checkpointing.CHECKSUM_FILE)))["crc32"]
    assert sum(f.startswith("state/") for f in listed) >= 5
    assert checkpointing.verify_checksums(step_dir) is None
    for rel in listed:
        path = os.path.join(step_dir, rel)
        original = open(path, "rb").read()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        try:
            open(path, "wb").write(bytes(flipped))
            assert "fails its CRC-32 check" in checkpointing.verify_checksums(step_dir), rel
        finally:
            open(path, "wb").write(original)
    assert checkpointing.verify_checksums(step_dir) is None


@pytest.mark.slow
def test_resume_past_corrupt_latest_saves_that_step_again(trained, run_copy):
    """The issue's stuck run: the latest checkpoint is corrupt; the rerun resumes from the
    previous one, saves step 6 again (no 'already exists'), ends with bitwise the original
    parameters, keeps the corrupt copy, and logs every step once."""
    faults.flip64(os.path.join(run_copy, "checkpoints", "6"))
    state = pretrain.train(tiny(), run_copy)
    assert int(state.step) == STEPS
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(trained[1].params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ckpt_dir = os.path.join(run_copy, "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6", "corrupt-6"]
    assert checkpointing.verify_checksums(os.path.join(ckpt_dir, "6")) is None
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_copy, "metrics.jsonl"))]
    assert steps == [1, 2, 4, 5, 6]  # 6 (logged before the corruption) once; 5: first resumed


@pytest.mark.slow
def test_all_metadata_garbage_refuses_instead_of_starting_over(run_copy):
    """No readable checkpoint: refused with one message naming them, nothing moved or
    overwritten (config.json included); start_over moves them aside and starts at step 0."""
    ckpt_dir = os.path.join(run_copy, "checkpoints")
    for s in ("2", "4", "6"):
        faults.garbage_meta(os.path.join(ckpt_dir, s))
    config_json = open(os.path.join(run_copy, "config.json")).read()
    with pytest.raises(checkpointing.NoReadableCheckpointError,
                       match=r"no readable checkpoint .*corrupt: .*/2, .*/4, .*/6\); refusing"):
        pretrain.train(tiny(), run_copy)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "6"]
    assert open(os.path.join(run_copy, "config.json")).read() == config_json
    state = pretrain.train(tiny(max_steps=2), run_copy, start_over=True)
    assert int(state.step) == 2
    assert sorted(os.listdir(ckpt_dir)) == ["2", "corrupt-2", "corrupt-4", "corrupt-6"]


@pytest.mark.slow
def test_changed_config_is_refused_unless_allowed(run_copy):
    config_json = open(os.path.join(run_copy, "config.json")).read()
    changed = tiny(optim__lr=0.1, seed=3)
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"differs from the run's .*config.json \(optim.lr: 0.5 -> 0.1; "
                             r"seed: 0 -> 3\).*--allow_config_change"):
        pretrain.train(changed, run_copy)
    assert open(os.path.join(run_copy, "config.json")).read() == config_json
    assert int(pretrain.train(tiny(), run_copy).step) == 6  # same config: nothing to train
    history = os.path.join(run_copy, "config_history.jsonl")
    # Allowed but nothing trained under it (the run is at its end): nothing recorded.
    pretrain.train(changed, run_copy, allow_config_change=True)
    assert not os.path.exists(history)
    assert open(os.path.join(run_copy, "config.json")).read() == config_json
    changed.train.max_steps = 8  # recorded with the first checkpoint saved under it
    pretrain.train(changed, run_copy, allow_config_change=True)
    records = [json.loads(line) for line in open(history)]
    assert records[-1]["changes"] == {"optim.lr": [0.5, 0.1], "seed": [0, 3],
                                      "train.max_steps": [6, 8]}
    assert records[-1]["accepted"] is True and records[-1]["step"] == 8
    assert checkpointing.read_config(run_copy).optim.lr == 0.1
    c = tiny(max_steps=10, optim__lr=0.1, seed=3)
    c.train.log_every_steps = 3
    pretrain.train(c, run_copy)  # only allow-listed fields differ now: accepted
    last = json.loads(open(history).readlines()[-1])
    assert last["changes"] == {"train.log_every_steps": [2, 3], "train.max_steps": [8, 10]}
    assert last["accepted"] is False and last["step"] == 10


@pytest.mark.slow
def test_failed_background_save_stops_at_the_next_step(run_copy, monkeypatch):
    """A full disk while the save of step 8 finishes (simulated: ENOSPC from the last write
    of the save) is reported at the next step with the path and errno; 2, 4, 6 stay intact."""
    def disk_full(root):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), root)
    monkeypatch.setattr(checkpointing, "write_checksums", disk_full)
    with pytest.raises(checkpointing.CheckpointSaveError) as e:
        pretrain.train(tiny(max_steps=10), run_copy)
    assert e.value.errno_value == errno.ENOSPC and e.value.step == 8
    assert str(e.value).startswith(f"saving checkpoint 8 to {run_copy}/checkpoints/8 failed "
                                   "(errno 28 ENOSPC: No space left on device)")
    ckpt = checkpointing.Checkpointer(run_copy, tiny())
    assert ckpt.all_steps() == [2, 4, 6]
    ckpt.close()
    for s in (2, 4, 6):
        assert checkpointing.verify_checksums(os.path.join(run_copy, "checkpoints",
                                                           str(s))) is None


@pytest.mark.slow
def test_sigint_saves_and_stops_with_130(run_copy, monkeypatch):
    sample = sampling.sample_widths
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a pytest-xdist worker

    calls = []

    def ctrl_c_in_step_7(s, step, *args):
        calls.append(step)
        if step == 6 and calls.count(6) == 2:  # (the ETA's cost table draws it first)
            os.kill(os.getpid(), signal.SIGINT)
        return sample(s, step, *args)
    monkeypatch.setattr(pretrain.sampling, "sample_widths", ctrl_c_in_step_7)
    with pytest.raises(pretrain.Preempted, match="interrupted \\(Ctrl-C\\) at step 7") as e:
        pretrain.train(tiny(max_steps=20), run_copy)
    assert e.value.exit_code == 130
    assert checkpointing.Checkpointer(run_copy, tiny()).all_steps()[-1] == 7
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_sigint_before_the_first_step_stops_without_saving(run_copy, monkeypatch):
    """A Ctrl-C during setup (here while the ETA's table is drawn) has no step to save: the
    run stops before training, with ``KeyboardInterrupt``, and writes nothing more."""
    sample = sampling.sample_widths

    def ctrl_c(s, step, *args):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return sample(s, step, *args)
    monkeypatch.setattr(pretrain.sampling, "sample_widths", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        pretrain.train(tiny(max_steps=20), run_copy)
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["2", "4", "6"]
    steps = [json.loads(line)["step"] for line in open(os.path.join(run_copy, "metrics.jsonl"))]
    assert max(steps) == 6


def test_an_unreadable_file_counts_as_corrupt(trained, monkeypatch):
    """(Tests run as root, which reads files whatever their mode: the PermissionError an
    ordinary user gets is injected.)"""
    step_dir = os.path.join(trained[0], "checkpoints", "2")
    crc = checkpointing.crc32_of_file

    def denied(path):
        if path.endswith("_METADATA"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return crc(path)
    monkeypatch.setattr(checkpointing, "crc32_of_file", denied)
    assert checkpointing.verify_checksums(step_dir) == (
        "state/_METADATA cannot be checked (PermissionError: [Errno 13] Permission denied: "
        f"'{step_dir}/state/_METADATA')")


def test_intact_checkpoint_of_another_state_structure_is_refused_not_moved(trained):
    """Files that pass their checksums but do not restore into this train state (another
    version's checkpoint) are not corrupt: refused with a message, never moved."""
    ckpt = checkpointing.Checkpointer(trained[0], tiny())
    other = {"params": build.abstract_state(tiny()).params, "extra": jax.ShapeDtypeStruct(
        (3,), np.float32)}
    with pytest.raises(checkpointing.CheckpointError,
                       match="checkpoint 6 in .* passes its checksums but does not restore"):
        ckpt.restore_latest(other, move_corrupt=True)
    ckpt.close()
    assert sorted(os.listdir(os.path.join(trained[0], "checkpoints"))) == ["2", "4", "6"]


def test_save_errors_take_errno_from_the_exception_chain_not_from_messages():
    """The error number comes from an ``OSError`` that carries one, wherever it is in the
    chain (raised from, or while handling); a message that only mentions an errno (as
    tensorstore's ``ValueError``s do) is reported as it is, with no number."""
    def chained(cause, explicit):
        try:
            try:
                raise cause
            except OSError as inner:
                if explicit:
                    raise RuntimeError("save thread failed") from inner
                raise RuntimeError("save thread failed")
        except RuntimeError as outer:
            return outer
    for explicit in (True, False):
        e = checkpointing.CheckpointSaveError(8, "/run/checkpoints/8", chained(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), explicit))
        assert e.errno_value == errno.ENOSPC and isinstance(e, OSError)
        assert str(e) == ("saving checkpoint 8 to /run/checkpoints/8 failed (errno 28 ENOSPC: "
                          "No space left on device)")
    denied = PermissionError(errno.EACCES, "Permission denied", "/run/x")
    assert checkpointing.find_os_error(chained(denied, True)) is denied
    text = "RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']"
    e = checkpointing.CheckpointSaveError(8, "/run/checkpoints/8", ValueError(text))
    assert e.errno_value is None and str(e).endswith(f"failed (ValueError: {text})")
    assert checkpointing.find_os_error(ValueError("[Errno 28] No space left on device")) is None


def test_a_save_that_cannot_fit_is_refused_before_writing(trained, run_copy, monkeypatch):
    """Less free space than the newest checkpoint takes: refused with ENOSPC and the sizes,
    nothing written (a tensorstore write failing half-way is reported without a number)."""
    usage = shutil.disk_usage(run_copy)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    ckpt = checkpointing.Checkpointer(run_copy, tiny())
    with pytest.raises(checkpointing.CheckpointSaveError,
                       match=r"saving checkpoint 8 to .*/8 failed \(errno 28 ENOSPC: No space "
                             r"left on device: 0.0 MB free, checkpoint 6 takes [0-9.]+ MB\)") as e:
        ckpt.save(8, trained[1])
    assert e.value.errno_value == errno.ENOSPC
    ckpt.close()
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["2", "4", "6"]


def test_checkpointing_imports_no_builder():
    """Checkpointing builds nothing: importing it loads none of ``build``, ``teacher``,
    ``export``, ``evaluate`` (``load_pretrained`` takes ``abstract_state`` from its caller).
    The config schema it reads and writes is stood in for by an empty module: what
    ``config.py`` imports is that module's own matter (issue 21, item 3)."""
    code = ("import sys, types\n"
            "sys.modules['us3l_jax.config'] = types.ModuleType('us3l_jax.config')\n"
            "import us3l_jax.checkpointing\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('us3l_jax'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), check=True)
    loaded = set(out.stdout.split())
    assert "us3l_jax.checkpointing" in loaded
    builders = ("us3l_jax.build", "us3l_jax.teacher", "us3l_jax.export", "us3l_jax.evaluate")
    assert not {m for m in loaded if m.startswith(builders)}, loaded


def test_a_checkpoint_without_its_checksum_file_is_unverified_and_moved_aside(run_copy, caplog):
    """Every checkpoint of this version is sealed with its checksums: one without them cannot
    be verified and counts as corrupt (moved aside; the previous one is restored), unless
    the caller trusts unverified checkpoints."""
    ckpt_dir = os.path.join(run_copy, "checkpoints")
    os.remove(os.path.join(ckpt_dir, "6", checkpointing.CHECKSUM_FILE))
    assert checkpointing.verify_checksums(os.path.join(ckpt_dir, "6")) == (
        "its us3l_checksums.json is missing (unverified; --trust_unverified_checkpoints uses "
        "it anyway)")
    trusting = checkpointing.Checkpointer(run_copy, tiny(), trust_unverified=True)
    with caplog.at_level("WARNING"):
        assert trusting.restore_latest(build.abstract_state(tiny()))[0] == 6
    trusting.close()
    assert "used unverified (--trust_unverified_checkpoints)" in caplog.text
    assert checkpointing.load_pretrained(run_copy, abstract_state=build.abstract_state).step == 4
    ckpt = checkpointing.Checkpointer(run_copy, tiny())
    step, state = ckpt.restore_latest(build.abstract_state(tiny()), move_corrupt=True)
    ckpt.close()
    assert (step, int(state.step)) == (4, 4)
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4", "corrupt-6"]


def test_a_lost_config_json_is_rebuilt_from_the_checkpoint(run_copy, caplog):
    path = os.path.join(run_copy, "config.json")
    original = open(path).read()
    os.remove(path)
    ckpt = checkpointing.Checkpointer(run_copy, tiny())
    with pytest.raises(checkpointing.CheckpointError, match=r"optim.lr: 0.5 -> 0.1"):
        checkpointing.check_config_change(run_copy, tiny(optim__lr=0.1),
                                          recorded=ckpt.recorded_config)
    ckpt.close()
    assert json.loads(open(path).read()) == json.loads(original)
    assert "config.json was missing; rebuilt from checkpoint 6" in caplog.text
    open(path, "w").write("{garbage")  # unreadable: rebuilt too, the bad copy kept
    ckpt = checkpointing.Checkpointer(run_copy, tiny())
    assert checkpointing.check_config_change(run_copy, tiny(),
                                             recorded=ckpt.recorded_config) is None
    ckpt.close()
    assert json.loads(open(path).read()) == json.loads(original)
    assert open(path + ".unreadable").read() == "{garbage"


def test_a_lost_config_json_without_a_record_needs_allow_and_is_then_written(run_copy,
                                                                             monkeypatch):
    """Checkpoints that do not record the config (older ones): the resume is refused unless
    allowed; allowed, config.json is written once the restore has succeeded."""
    path = os.path.join(run_copy, "config.json")
    os.remove(path)
    monkeypatch.setattr(checkpointing.Checkpointer, "recorded_config", lambda self: None)
    with pytest.raises(checkpointing.CheckpointError,
                       match=rf"{path} is missing, and no checkpoint records the run's config, "
                             r"so this config cannot be compared .* --allow_config_change"):
        pretrain.train(tiny(), run_copy)
    assert not os.path.exists(path)
    assert int(pretrain.train(tiny(), run_copy, allow_config_change=True).step) == 6
    assert checkpointing.read_config(run_copy).optim.lr == tiny().optim.lr
    record = json.loads(open(os.path.join(run_copy, "config_history.jsonl")).read())
    assert record["changes"] == "config.json was missing; replaced" and record["step"] == 6


@pytest.mark.slow
def test_an_allowed_change_that_does_not_fit_the_state_leaves_config_json(run_copy):
    """AdamW's state has another structure than SGD's: the resume fails with that reason,
    and config.json, which the original command needs, is untouched."""
    config_json = open(os.path.join(run_copy, "config.json")).read()
    adamw = tiny(max_steps=8, optim__optimizer="adamw", optim__weight_decay=1e-4,
                 optim__reg_lambda=0.0)
    with pytest.raises(checkpointing.CheckpointError) as e:
        pretrain.train(adamw, run_copy, allow_config_change=True)
    message = str(e.value)
    assert message.startswith(f"checkpoint 6 in {run_copy}/checkpoints does not fit the train "
                              "state of this config: its opt_state differs in structure (")
    assert "optim.optimizer: 'sgd' -> 'adamw'" in message and "another version" not in message
    assert open(os.path.join(run_copy, "config.json")).read() == config_json
    assert not os.path.exists(os.path.join(run_copy, "config_history.jsonl"))
    assert int(pretrain.train(tiny(max_steps=8), run_copy).step) == 8  # the original resumes


@pytest.mark.slow
def test_a_nan_resume_records_no_config_change(run_copy):
    config_json = open(os.path.join(run_copy, "config.json")).read()
    with pytest.raises(pretrain.NonFiniteLossError):
        pretrain.train(tiny(max_steps=8, optim__lr=1e30), run_copy, allow_config_change=True)
    assert open(os.path.join(run_copy, "config.json")).read() == config_json
    assert not os.path.exists(os.path.join(run_copy, "config_history.jsonl"))
    assert int(pretrain.train(tiny(max_steps=8), run_copy).step) == 8  # the original resumes


def _at_step(monkeypatch, step, action):
    """Runs ``action()`` when the loop draws the widths of ``step``."""
    sample = sampling.sample_widths

    def hooked(s, k, *args):
        if k == step:
            action()
        return sample(s, k, *args)
    monkeypatch.setattr(pretrain.sampling, "sample_widths", hooked)


@pytest.mark.parametrize("fault", ["delete", "rename", "replace"])
def test_a_workdir_that_vanishes_mid_run_stops_it_and_nothing_is_recreated(run_copy, tmp_path,
                                                                          monkeypatch, fault):
    moved = str(tmp_path / "moved")

    def vanish():
        if fault == "delete":
            shutil.rmtree(run_copy)
        else:
            os.rename(run_copy, moved)
            if fault == "replace":  # an unmount looks like this: another directory there
                os.mkdir(run_copy)
    _at_step(monkeypatch, 7, vanish)  # (the ETA's cost table draws step 7 first: vanishes
    with pytest.raises(workdir_lock.WorkdirLostError,  # before the loop's first step)
                       match=rf"the workdir {run_copy} was deleted, renamed, replaced or "
                             r"unmounted during the run \(.*\); stopped at step 7 without "
                             r"writing anything more"):
        pretrain.train(tiny(max_steps=10), run_copy)
    if fault == "delete":
        assert not os.path.exists(run_copy)
    elif fault == "replace":
        assert os.listdir(run_copy) == []
    else:
        assert not os.path.exists(run_copy)
    if fault != "delete":  # the run's files are where they were moved, as they were
        assert sorted(os.listdir(os.path.join(moved, "checkpoints"))) == ["2", "4", "6"]
        steps = [json.loads(line)["step"] for line in open(os.path.join(moved,
                                                                        "metrics.jsonl"))]
        assert max(steps) == 6


def test_a_deleted_lock_stops_the_run_before_its_next_save(run_copy, monkeypatch):
    lock = os.path.join(run_copy, workdir_lock.LOCK_FILE)
    _at_step(monkeypatch, 7, lambda: os.remove(lock))
    with pytest.raises(workdir_lock.WorkdirLostError,
                       match=rf"the workdir lock {lock} was deleted or replaced during the run"):
        pretrain.train(tiny(max_steps=10), run_copy)
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["2", "4", "6"]


def test_rerunning_a_finished_run_rewrites_nothing(run_copy):
    before = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
              for d, _, files in os.walk(run_copy) for f in files}
    assert int(pretrain.train(tiny(), run_copy).step) == 6
    after = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
             for d, _, files in os.walk(run_copy) for f in files}
    after.pop(os.path.join(run_copy, workdir_lock.LOCK_FILE))  # the lock names its holder
    before.pop(os.path.join(run_copy, workdir_lock.LOCK_FILE))
    assert after == before  # no new TensorBoard event file, no rewritten log or config


def test_loading_a_run_without_checkpoints_creates_nothing(trained, tmp_path):
    workdir = str(tmp_path / "killed_early")
    os.makedirs(workdir)
    shutil.copy(os.path.join(trained[0], "config.json"), workdir)
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in"):
        checkpointing.load_pretrained(workdir, abstract_state=build.abstract_state)
    assert os.listdir(workdir) == ["config.json"]
    os.makedirs(os.path.join(workdir, "checkpoints"))  # an empty folder: same answer
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint in"):
        checkpointing.load_pretrained(workdir, abstract_state=build.abstract_state)
    assert checkpointing.latest_step(workdir) is None


def test_evaluation_reads_the_recorded_config_when_config_json_is_lost(run_copy, caplog):
    original = checkpointing.read_config(run_copy)
    os.remove(os.path.join(run_copy, "config.json"))
    with caplog.at_level("WARNING"):
        assert checkpointing.read_config(run_copy) == original
    assert "config.json is missing; using the config recorded in checkpoint 6" in caplog.text
    assert not os.path.exists(os.path.join(run_copy, "config.json"))  # nothing written
    assert checkpointing.load_pretrained(run_copy, abstract_state=build.abstract_state).step == 6


def test_reading_a_run_prints_no_read_only_notices(trained, caplog):
    """Evaluation and export open checkpoints read-only; orbax announces what that implies in
    three absl WARNING lines, which the final sweep of ``main`` printed as if they were
    problems. They are dropped; other absl warnings still pass."""
    import logging as logging_lib
    caplog.set_level(logging_lib.WARNING)
    ckpt = checkpointing.Checkpointer(trained[0], None, read_only=True)
    try:
        assert ckpt.all_steps()
    finally:
        ckpt.close()
    absl = logging_lib.getLogger("absl")
    absl.warning("another absl warning")
    messages = [r.getMessage() for r in caplog.records]
    assert "another absl warning" in messages
    assert not [m for m in messages if "read only" in m or "read_only" in m], messages
