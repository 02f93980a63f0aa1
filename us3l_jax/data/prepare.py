"""``python -m us3l_jax.data.prepare <dataset> [--data_dir=DIR] [--manual_dir=DIR]
[--download_dir=DIR]``: download (where allowed) and convert a TFDS dataset to ArrayRecord, once.

Building needs TensorFlow, which training does not: install the ``[prepare]`` extra
(``pip install -e ".[prepare]" -c requirements.lock``). This is TFDS's own
``download_and_prepare`` with ``file_format=array_record``, what ``tfds build NAME
--file_format=array_record`` does; the ``tfds`` command line itself also imports
``apache_beam``, which cannot be installed beside the locked dependencies, so use this command.

* ``data_dir``: where the prepared dataset goes (default ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``, where training looks by default; else pass the same directory as
  ``--config.data.data_dir``).
* ``manual_dir``: ImageNet only, the folder with ``ILSVRC2012_img_train.tar`` and
  ``ILSVRC2012_img_val.tar`` (register at https://image-net.org to download them).
* ``download_dir``: where downloads are cached (default ``<data_dir>/downloads``); an archive
  already there is reused, nothing is fetched again.

Exit codes: 0 prepared (or already prepared); 2 bad arguments, TensorFlow missing, or the
download / build failed (one line).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from us3l_jax import cli
from us3l_jax.data import datasets

PROG = "python -m us3l_jax.data.prepare"
INSTALL = 'pip install -e ".[prepare]" -c requirements.lock'
FLAGS = flags.FlagValues()
flags.DEFINE_string("data_dir", None, "where the prepared dataset goes (default "
                    "$TFDS_DATA_DIR or ~/tensorflow_datasets)", flag_values=FLAGS)
flags.DEFINE_string("manual_dir", None, "ImageNet: the folder with ILSVRC2012_img_train.tar "
                    "and ILSVRC2012_img_val.tar", flag_values=FLAGS)
flags.DEFINE_string("download_dir", None, "download cache (default <data_dir>/downloads)",
                    flag_values=FLAGS)
_NAMES = ("data_dir", "manual_dir", "download_dir")


def usage() -> str:
    return (f"{__doc__.split(chr(10) + chr(10))[0]}\n\n"
            f"Datasets: {', '.join(datasets.TFDS_NAMES)} (digits ships with scikit-learn and "
            f"needs no preparation)\n\nFlags:\n{cli.format_flags(FLAGS, _NAMES)}\n\n"
            f"Needs TensorFlow: {INSTALL}\n")


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            download_dir: str | None = None) -> str:
    """Prepares dataset ``name`` as ArrayRecord in ``data_dir``; returns its directory.

    Raises ``ValueError`` for an unknown name or a missing manual dir, and ``ImportError``
    (checked first, before anything is created) if TensorFlow is not installed."""
    if name == "digits":
        raise ValueError("digits ships with scikit-learn and needs no preparation")
    if name not in datasets.TFDS_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(datasets.TFDS_NAMES)}")
    if name == "imagenet2012" and not manual_dir:
        raise ValueError("imagenet2012 needs --manual_dir=DIR holding ILSVRC2012_img_train.tar "
                         "and ILSVRC2012_img_val.tar (register at https://image-net.org)")
    if manual_dir and not os.path.isdir(manual_dir):
        raise ValueError(f"--manual_dir {manual_dir} is not a directory")
    try:
        import tensorflow  # noqa: F401 - TFDS builds with it; fail before creating anything
    except ImportError:
        raise ImportError(f"building {name} needs TensorFlow, which is not installed: "
                          f"{INSTALL}") from None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_datasets as tfds

    data_dir = os.path.abspath(data_dir or datasets.default_data_dir())
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_dir=download_dir, download_config=config)
    return builder.data_dir


def main(argv: Sequence[str] | None = None) -> int:
    rest = cli.parse(FLAGS, argv, PROG, usage, positional=True)
    if len(rest) != 2:
        cli.fail(PROG, f"name one dataset, e.g. {PROG} cifar100; got {rest[1:] or 'none'}")
    try:
        path = prepare(rest[1], FLAGS.data_dir, FLAGS.manual_dir, FLAGS.download_dir)
    except (ValueError, ImportError) as e:
        cli.fail(PROG, e)
    except Exception as e:  # noqa: BLE001 - download / build errors of TFDS: one line
        cli.fail(PROG, f"preparing {rest[1]} failed: {type(e).__name__}: {cli.one_line(e)}")
    data_dir = os.path.dirname(os.path.dirname(path))
    print(f"prepared {rest[1]} in {path}; train with --config.data.data_dir={data_dir}"
          + (" (or leave it out: the default)" if data_dir == os.path.abspath(
              datasets.default_data_dir()) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
