"""``python -m us3l_jax.data.prepare``: clear errors without TensorFlow (nothing created), and
with the ``[prepare]`` extra a real TFDS build of CIFAR-100 from a tiny local archive, offline,
read back by our TensorFlow-free loader."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from us3l_jax.data import datasets, prepare
from tests.helpers import REPO

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"


def _main(argv, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("argv,message", [
    ([], "name one dataset, e.g. python -m us3l_jax.data.prepare cifar100; got none"),
    (["mnist"], "unknown dataset 'mnist'; valid: cifar10, cifar100, imagenet2012"),
    (["digits"], "digits ships with scikit-learn and needs no preparation"),
    (["imagenet2012"], "imagenet2012 needs --manual_dir=DIR holding ILSVRC2012_img_train.tar"),
    (["cifar10", "--data-dir=x", "--nope=1"], "invalid flags: Unknown command line flag 'nope'"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    code, _, err = _main(argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_without_tensorflow_says_what_to_install_and_creates_nothing(tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    code, _, err = _main(["cifar100", f"--data_dir={tmp_path}/data"], capsys)
    assert code == 2
    assert err.strip() == (
        "python -m us3l_jax.data.prepare: error: building cifar100 needs TensorFlow, which is "
        'not installed: pip install -e ".[prepare]" -c requirements.lock')
    assert os.listdir(tmp_path) == []


def test_help_lists_datasets():
    proc = subprocess.run([sys.executable, "-m", "us3l_jax.data.prepare", "--help"], cwd=REPO,
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0
    assert "Datasets: cifar10, cifar100, imagenet2012" in proc.stdout
    assert "--manual_dir: ImageNet: the folder" in proc.stdout


def _tiny_cifar100(download_dir, n_train=200, n_test=100):
    """A CIFAR-100 archive in the real binary layout (coarse label, fine label, 3072 bytes of
    CHW pixels per record), placed where TFDS looks for a cached download of the real one."""
    from tensorflow_datasets.core.download import checksums, resource
    rng = np.random.default_rng(0)

    def records(n):
        return b"".join(bytes([f // 5, f]) + rng.integers(0, 256, 3072, np.uint8).tobytes()
                        for f in np.arange(n) % 100)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [("train.bin", records(n_train)), ("test.bin", records(n_test)),
                           ("coarse_label_names.txt", "\n".join(f"c{i}" for i in range(20))),
                           ("fine_label_names.txt", "\n".join(f"f{i}" for i in range(100)))]:
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo("cifar-100-binary/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = checksums.get_all_url_infos()[CIFAR100_URL]
    path = os.path.join(download_dir, resource.get_dl_fname(CIFAR100_URL, expected.checksum))
    os.makedirs(download_dir)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    with open(path + ".INFO", "w") as f:
        json.dump({"urls": [CIFAR100_URL], "original_fname": "cifar-100-binary.tar.gz"}, f)


def test_builds_cifar100_from_a_local_archive_and_our_loader_reads_it(tmp_path, capsys):
    pytest.importorskip("tensorflow", reason="needs the [prepare] extra (TensorFlow)")
    _tiny_cifar100(str(tmp_path / "downloads"))
    data = str(tmp_path / "data")
    code = prepare.main(["cifar100", f"--data_dir={data}", f"--download_dir={tmp_path}/downloads"])
    assert code == 0
    assert f"train with --config.data.data_dir={data}" in capsys.readouterr().out
    assert datasets.num_examples("cifar100", "train", data_dir=data) == 200
    assert datasets.num_examples("cifar100", "test", data_dir=data) == 100
