"""Atomic writes: the new file whole or the old one, with the modes any new file gets under the umask."""

from __future__ import annotations

import stat

import pytest

from metascale.files import atomic_write, make_temp_dir


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_gives_the_umask_mode(tmp_path, umask):
    path = tmp_path / "ckpt-000100.pt"
    atomic_write(path, b"one")
    assert path.read_bytes() == b"one" and _mode(path) == 0o666 & ~umask  # 0644 under 022, 0600 under 077
    path.chmod(0o600)
    atomic_write(path, b"two")  # a replacement is a new file: it gets the umask mode, not the old file's
    assert path.read_bytes() == b"two" and _mode(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000100.pt"]  # no temporary file left behind


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "index.json"
    atomic_write(path, b"old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("metascale.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_temporary_folders_get_the_umask_mode(tmp_path, umask):
    made = {make_temp_dir(tmp_path, "set.partial-") for _ in range(3)}
    assert len(made) == 3
    assert all(p.parent == tmp_path and p.name.startswith("set.partial-") and _mode(p) == 0o777 & ~umask for p in made)
