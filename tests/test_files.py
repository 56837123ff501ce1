"""Atomic writes: all or nothing, nothing partial left behind, unwritable folders named."""

import tempfile

import pytest

from hyperbooth.errors import ConfigError
from hyperbooth.files import atomic_write, atomic_write_all, check_writable


def _text(content):
    return lambda tmp: open(tmp, "w").write(content)


def test_atomic_write_all_renames_only_when_every_write_succeeded(tmp_path):
    (tmp_path / "a.txt").write_text("old a")

    def fail(tmp):
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        atomic_write_all([(tmp_path / "a.txt", _text("new a")), (tmp_path / "b.txt", fail)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"
    assert atomic_write_all([(tmp_path / "a.txt", _text("new a")), (tmp_path / "b.txt", _text("b"))]) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new a" and (tmp_path / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporaries


def test_a_target_that_is_a_folder_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(ConfigError, match="grid.png.*is a folder"):
        atomic_write_all([(tmp_path / "a.png", _text("a")), (tmp_path / "grid.png", _text("grid"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_unwritable_and_missing_folders_are_named(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="missing.*does not exist"):
        atomic_write(tmp_path / "missing" / "x.txt", _text("x"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="'--out x'.*is not a folder"):
        check_writable(tmp_path / "file", "'--out x'")
    with pytest.raises(ConfigError, match="does not exist"):
        check_writable(tmp_path / "nowhere", "--out")
    check_writable(tmp_path, "--out")  # writable: no error, no probe left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # as in a read-only folder (chmod does not stop root)
    with pytest.raises(ConfigError, match="cannot write in .*Permission denied"):
        check_writable(tmp_path, "--out")
    with pytest.raises(ConfigError, match="cannot write '.*y.txt': Permission denied"):
        atomic_write(tmp_path / "y.txt", _text("y"))


def test_files_digest_covers_bytes_and_with_root_names(tmp_path):
    from hyperbooth.files import files_digest

    (tmp_path / "a.bin").write_bytes(b"weights")
    (tmp_path / "b.bin").write_bytes(b"weights")
    assert files_digest([tmp_path / "a.bin"]) == files_digest([tmp_path / "b.bin"])  # bytes only
    assert files_digest([tmp_path / "a.bin"], root=tmp_path) != files_digest([tmp_path / "b.bin"], root=tmp_path)
    (tmp_path / "b.bin").write_bytes(b"weightz")
    assert files_digest([tmp_path / "a.bin"]) != files_digest([tmp_path / "b.bin"])
