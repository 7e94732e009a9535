"""retrieval.infra.io: the one copy of the file and environment helpers the packages share."""

from __future__ import annotations

import errno
import hashlib
import os
from importlib.metadata import version

import pytest

from retrieval.infra.io import atomic_write, fsync_dir, package_versions, sha256_file


def test_sha256_file_matches_hashlib_over_several_blocks(tmp_path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)  # spans three 1 MiB reads
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path, "w") as handle:
        handle.write("new")
        raise RuntimeError("stop")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.skipif(os.name != "posix", reason="folder fsync is POSIX only")
def test_fsync_dir_syncs_and_skips_only_unsupported_file_systems(tmp_path, monkeypatch) -> None:
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    fsync_dir(tmp_path)
    assert len(calls) == 1

    def refuse(code: int):
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))
    fsync_dir(tmp_path)  # a file system that cannot sync folders: skipped
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        fsync_dir(tmp_path)  # a real failure is raised
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


def test_package_versions_lists_installed_packages_and_skips_missing_ones() -> None:
    got = package_versions(("numpy", "no-such-package-xyz"))
    assert got["numpy"] == version("numpy") and "python" in got
    assert "no-such-package-xyz" not in got
