"""privacy.paths: reading a regular file never waits and refuses what is not one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from privacy.paths import NotRegularFileError, read_regular_bytes


def test_read_regular_bytes_reads_up_to_limit_and_refuses_what_is_not_a_file(tmp_path: Path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 3_000_000)
    assert read_regular_bytes(f) == b"x" * 3_000_000
    assert read_regular_bytes(f, 5) == b"xxxxx"
    assert read_regular_bytes(f, 0) == b""
    with pytest.raises(IsADirectoryError):
        read_regular_bytes(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_regular_bytes(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError):  # returns at once: never waits for a writer
        read_regular_bytes(fifo)
