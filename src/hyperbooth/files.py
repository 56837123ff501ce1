"""Atomic file writes: write a temporary file beside the target, then rename it into place.

A crash or an error mid-write leaves the previous file (or none) and no partial file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from hyperbooth.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path``; the folder must exist."""
    return atomic_write_all([(path, write)])[0]


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Callable[[str], None]]]) -> list[Path]:
    """:func:`atomic_write` for several files as one: each ``write(tmp)`` fills a temporary file beside its target,
    and only when all succeeded are they renamed into place. An error while writing leaves every target as it was
    and no temporary file behind; a folder that cannot be written, or a target that is a folder, is a
    :class:`ConfigError` naming it (checked before anything is written). The renames at the end run one after the
    other: each is atomic, but an ``os.replace`` failing between two of them (after every write succeeded, within
    the same folders) would leave the earlier targets replaced."""
    writes = [(Path(path), write) for path, write in writes]
    for path, _ in writes:
        if not path.parent.is_dir():
            raise ConfigError(f"output folder {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise ConfigError(f"cannot write {str(path)!r}: it is a folder")
    temps: list[tuple[str, Path]] = []
    try:
        for path, write in writes:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as e:
                raise ConfigError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise
    return [path for _, path in temps]


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` unless a file can be created in ``folder`` (checked by creating and
    removing one, which also catches read-only mounts and ACLs that permission bits do not show)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {str(folder)!r} {'is not a folder' if folder.exists() else 'does not exist'}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hyperbooth-probe.", dir=folder)
    except OSError as e:
        raise ConfigError(f"{what}: cannot write in {str(folder)!r} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def files_digest(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """The first 16 hex digits of the SHA-256 of these files' bytes, in the order given; with ``root``, each file's
    path relative to it (and a NUL) goes in before its bytes, so that renaming a file changes the digest."""
    import hashlib

    digest = hashlib.sha256()
    for path in map(Path, paths):
        if root is not None:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
