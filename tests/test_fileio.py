"""Atomic writes give files the mode of an ordinary open(): 0666 less the umask."""
import os
import stat

import pytest

from us3l_jax import fileio


@pytest.fixture
def umask():
    """Sets the umask for one test and restores the previous one."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600),
                                       (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    path = tmp_path / "sub" / "f.json"
    fileio.atomic_write_text(path, "{}")
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert path.read_text() == "{}"
    # The same as a plain open() under that umask, and the umask itself is left as it was.
    with open(tmp_path / "plain", "w"):
        pass
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == mode
    assert fileio.current_umask() == mask


def test_replacing_a_file_keeps_it_complete_and_leaves_no_temporary(tmp_path, umask):
    path = tmp_path / "x.bin"
    fileio.atomic_write_bytes(path, b"old")
    fileio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_unusable_dir_names_the_problem(tmp_path):
    (tmp_path / "f").write_text("x")
    assert fileio.unusable_dir(tmp_path / "new" / "run") is None
    assert fileio.unusable_dir(tmp_path) is None
    assert fileio.unusable_dir(tmp_path / "f") == "it exists and is a file, not a directory"
    assert fileio.unusable_dir(tmp_path / "f" / "run") == (
        f"{tmp_path / 'f'} is a file, so no directory can be created below it")
    assert fileio.unusable_dir("/proc/1/run").startswith("/proc/1/run is on a virtual file "
                                                         "system (proc)")
