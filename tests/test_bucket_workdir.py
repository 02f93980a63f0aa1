"""A workdir in a bucket (``gs://``), through the command lines as a user runs them, on the
fake bucket of tests/fake_gcs.py (served to the subprocesses by tests/fake_gcs_site):
pretrain, kill -9, resume (bitwise the uninterrupted run on a local disk), evaluate, export; a
live lease refuses a second run; what cannot work is refused in one line before any work."""
import json
import os
import re
import time

import jax
import pytest

from us3l_jax import build, checkpointing, fileio, paths, pretrain
from tests import fake_gcs
from tests.helpers import REPO, demo_config, leaves_equal, run_main

SITE = os.path.join(REPO, "tests", "fake_gcs_site")
BUCKET = "test-bucket"
WORKDIR = f"gs://{BUCKET}/runs/demo"


def served(root: str) -> dict:
    """The environment of a subprocess that sees the fake bucket under ``root``."""
    return {"PYTHONPATH": os.pathsep.join([SITE, REPO]), "US3L_FAKE_GCS_ROOT": root}


def smoke_flags(steps: int) -> list[str]:
    return [f"--config.train.max_steps={steps}", "--config.train.checkpoint_every_steps=5",
            "--config.train.log_every_steps=5", "--config.train.compile_ahead=False",
            "--config.eval.final_sweep=False"]


def run_cli(module: str, root: str, *flags: str):
    import subprocess
    import sys
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **served(root))
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=900)


@pytest.fixture
def root(tmp_path) -> str:
    root = str(tmp_path / "fake_gcs")
    fake_gcs.make_bucket(root, BUCKET)
    return root


def run_objects(root: str) -> list[str]:
    prefix = WORKDIR.removeprefix(f"gs://{BUCKET}/") + "/"
    return [o.removeprefix(prefix) for o in fake_gcs.objects(root, BUCKET)]


@pytest.mark.slow
def test_pretrain_kill_resume_evaluate_export_on_a_bucket(root, tmp_path):
    """The run is killed (-9) after its first checkpoint, as a lost VM would leave it: its
    lease stays; the rerun on this host takes it over at once (the process is gone), resumes
    and ends bitwise equal to an uninterrupted run on a local disk. Then evaluate and export
    read the bucket run."""
    run = run_main("configs/demo.py:smoke", WORKDIR, *smoke_flags(10), env=served(root),
                   wait=False)
    try:
        deadline = time.time() + 600
        while "checkpoints/5/commit_success.txt" not in run_objects(root):
            assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.1)
    finally:
        run.kill()
        stdout = run.communicate()[0]
    assert f"new run in {WORKDIR}" in stdout
    objects = run_objects(root)
    # (metrics.jsonl is uploaded every 30 s and at the end: this run was killed before either)
    assert {"config.json", ".us3l.lease", "checkpoints/5/us3l_checksums.json",
            "checkpoints/5/commit_success.txt"} <= set(objects), objects
    assert "checkpoints/10/commit_success.txt" not in objects, "killed too late"
    assert ".us3l.lock" not in objects  # no fcntl lock in a bucket
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # nothing local named after the URL

    out = run_main("configs/demo.py:smoke", WORKDIR, *smoke_flags(10), env=served(root))
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"taking over the lease of {WORKDIR} from pid {run.pid} on host " in out.stdout
    assert f"its process (pid {run.pid} on this host) has ended" in out.stdout
    assert f"resuming {WORKDIR} from step 5" in out.stdout
    objects = run_objects(root)
    assert ".us3l.lease" not in objects  # removed by the run that ended
    assert any(o.startswith("tb/events.out.tfevents.") for o in objects)
    with fake_gcs.install(root):
        from us3l_jax import paths
        steps = [json.loads(line)["step"]
                 for line in paths.read_text(f"{WORKDIR}/metrics.jsonl").splitlines()]
        bucket_params = checkpointing.load_pretrained(
            WORKDIR, abstract_state=build.abstract_state).params
    assert steps == sorted(set(steps)) and steps[-1] == 10  # each step once after the resume

    local = demo_config("smoke", train__max_steps=10, train__checkpoint_every_steps=5,
                        train__log_every_steps=5, train__compile_ahead=False,
                        eval__final_sweep=False)
    pretrain.train(local, str(tmp_path / "local"))  # uninterrupted, on the local disk
    local_params = checkpointing.load_pretrained(
        str(tmp_path / "local"), abstract_state=build.abstract_state).params
    assert leaves_equal(bucket_params, local_params)  # stop + resume in a bucket: bitwise

    out = run_cli("us3l_jax.evaluate", root, f"--workdir={WORKDIR}", "--widths=1.0,0.5",
                  "--protocol=fast")
    assert out.returncode == 0, out.stdout[-3000:]
    sweep_key = re.search(r"^BN statistics (\S+): calibrated at 1.0, 0.5$", out.stdout,
                          re.M).group(1)
    objects = run_objects(root)
    assert {"eval/fast-1.0_0.5/sweep.json", "eval/fast-1.0_0.5/sweep.md",
            "eval/fast-1.0_0.5/sweep.png",
            f"bn_stats/step_10/{sweep_key}/width_1.0.msgpack",
            f"bn_stats/step_10/{sweep_key}/width_0.5.msgpack"} <= set(objects), objects
    assert any(o.startswith("eval/fast-1.0_0.5/tb/events.") for o in objects)
    with fake_gcs.install(root):
        sweep = json.loads(paths.read_text(f"{WORKDIR}/eval/fast-1.0_0.5/sweep.json"))
    assert [r["width"] for r in sweep] == [1.0, 0.5]
    assert all(r["step"] == 10 and 10 < r["accuracy"] <= 100 for r in sweep)

    export_dir = str(tmp_path / "export")
    out = run_cli("us3l_jax.export", root, f"--workdir={WORKDIR}", "--width=0.5",
                  f"--out={export_dir}", "--format=flax")
    assert out.returncode == 0, out.stdout[-3000:]
    with open(os.path.join(export_dir, "model_card.json")) as f:
        card = json.load(f)
    assert card["source"]["workdir"] == WORKDIR and card["source"]["step"] == 10


def test_a_live_lease_refuses_a_second_run_before_any_work(root):
    """Another run's lease (another host, heartbeat 5 s ago): one line, exit 2, nothing
    written; the lease is left as it was."""
    lease = {"run": "other-run", "host": "worker-0-elsewhere", "pid": 4242,
             "started": time.time() - 60, "heartbeat": time.time() - 5}
    with fake_gcs.install(root):
        fileio.atomic_write_text(f"{WORKDIR}/.us3l.lease", json.dumps(lease))
    out = run_main("configs/demo.py:smoke", WORKDIR, *smoke_flags(5), env=served(root))
    assert out.returncode == 2, out.stdout[-3000:]
    assert "Traceback" not in out.stdout
    assert f"{WORKDIR} is in use by another run (pid 4242 on host worker-0-elsewhere, " \
           f"heartbeat " in out.stdout and "US3L_LEASE_STALE_S=600" in out.stdout
    assert run_objects(root) == [".us3l.lease"]
    with fake_gcs.install(root):
        assert json.loads(paths.read_text(f"{WORKDIR}/.us3l.lease")) == lease


@pytest.mark.parametrize("workdir,message", [
    ("s3://b/run", "--workdir=s3://b/run: s3:// is not supported; use a local path or "
                   "gs://bucket/path"),
    ("gs://no-such-bucket/run", "--workdir=gs://no-such-bucket/run: bucket "
                                "gs://no-such-bucket does not exist or cannot be reached"),
])
def test_a_workdir_url_that_cannot_work_is_one_line(root, workdir, message):
    out = run_main("configs/demo.py:smoke", workdir, env=served(root))
    assert out.returncode == 2 and "Traceback" not in out.stdout
    assert message in out.stdout, out.stdout[-2000:]
    assert fake_gcs.objects(root, BUCKET) == []


def test_checkpoints_in_a_bucket_are_verified_and_a_corrupt_one_moved_aside(root, caplog):
    """Checksums are written into a bucket checkpoint and checked on restore; a flipped bit in
    the newest makes the restore fall back to the previous one and move it to corrupt-<step>
    (a copy and a delete in a bucket), where the run can save that step again."""
    import jax.numpy as jnp
    import numpy as np
    config = demo_config("smoke")
    with fake_gcs.install(root):
        ckpt = checkpointing.Checkpointer(WORKDIR, config)
        for step in (1, 2):
            ckpt.save(step, {"w": jnp.arange(6, dtype=jnp.float32) * step})
        ckpt.wait()
        ckpt.close()
        newest = f"{WORKDIR}/checkpoints/2"
        assert checkpointing.verify_checksums(newest) is None
        listed = json.loads(paths.read_text(f"{newest}/{checkpointing.CHECKSUM_FILE}"))
        data = sorted(f for f in listed["crc32"] if "/d/" in f)[0]
        blob = bytearray(paths.read_bytes(f"{newest}/{data}"))
        blob[len(blob) // 2] ^= 0x01
        fileio.atomic_write_bytes(f"{newest}/{data}", bytes(blob))
        assert "fails its CRC-32 check" in checkpointing.verify_checksums(newest)
        ckpt = checkpointing.Checkpointer(WORKDIR, config)
        with caplog.at_level("WARNING"):
            step, state = ckpt.restore_latest(
                {"w": jax.ShapeDtypeStruct((6,), jnp.float32)}, move_corrupt=True)
        assert step == 1 and np.array_equal(state["w"], np.arange(6, dtype=np.float32))
        assert ckpt.all_steps() == [1]
        ckpt.save(2, {"w": jnp.full((6,), 7.0)})  # the corrupt step is saved again
        ckpt.wait()
        ckpt.close()
        assert paths.listdir(f"{WORKDIR}/checkpoints") == ["1", "2", "corrupt-2"]
    assert f"moved corrupt checkpoint 2 to {WORKDIR}/checkpoints/corrupt-2" in caplog.text


def test_export_out_is_a_local_folder():
    from us3l_jax.export import command
    with pytest.raises(ValueError, match=r"^--out 'gs://b/w05': exports are written to a local "
                       r"folder; give a local --out and copy it \(gcloud storage cp -r <out> "
                       r"gs://b/w05\)$"):
        command.check_out("gs://b/w05")
