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


def test_path_problem_names_a_symbolic_link_loop_and_never_claims_it_absent(tmp_path: Path):
    """A --resume or run directory that was a symbolic link loop was said not to exist; the
    one wording of every command now says what the system said."""
    from privacy.paths import path_problem

    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "f").write_text("x")
    for looped in ("loop", "loop/run", "a"):
        for want in ("directory", "file"):
            why = path_problem(tmp_path / looped, want)
            assert why is not None and why.startswith("is a symbolic link loop")
    assert path_problem(tmp_path / "missing") == "does not exist"
    assert path_problem(tmp_path / "f" / "run") == "cannot be reached (Not a directory)"
    assert path_problem(tmp_path / "f") == "is not a directory"
    assert path_problem(tmp_path / "f", "file") is None
    assert path_problem(tmp_path) is None
    assert path_problem(tmp_path, "file") == "is a directory, not a file"


def test_path_problem_missing_ok_says_only_what_is_in_the_way(tmp_path: Path):
    """A caller about to create a path asks structurally whether something else is there
    (``missing_ok``), not by comparing the words "does not exist"."""
    from privacy.paths import path_problem

    (tmp_path / "f").write_text("x")
    (tmp_path / "loop").symlink_to("loop")
    assert path_problem(tmp_path / "missing", "file", missing_ok=True) is None
    assert path_problem(tmp_path / "missing", missing_ok=True) is None
    assert path_problem(tmp_path / "missing", "file") == "does not exist"
    assert path_problem(tmp_path, "file", missing_ok=True) == "is a directory, not a file"
    assert path_problem(tmp_path / "f", missing_ok=True) == "is not a directory"
    assert path_problem(tmp_path / "f" / "x", missing_ok=True) == "cannot be reached (Not a directory)"
    assert str(path_problem(tmp_path / "loop", "file", missing_ok=True)).startswith(
        "is a symbolic link loop")


def test_check_given_file_names_the_option_the_path_and_what_is_wrong(tmp_path: Path):
    """A file-taking flag's one error line: the flag, what the file is, its path, why, and
    what to give; a regular file is returned as a Path."""
    from privacy.paths import check_given_file

    class Bad(Exception):
        pass

    (tmp_path / "f").write_text("x")
    assert check_given_file(str(tmp_path / "f"), "anchor", Bad, "--anchor") == tmp_path / "f"
    with pytest.raises(Bad) as missing:
        check_given_file(tmp_path / "nope", "anchor", Bad, "--anchor", " (give a copy)")
    assert (
        str(missing.value) == f"--anchor: anchor {tmp_path / 'nope'} does not exist (give a copy)"
    )
    with pytest.raises(Bad, match=r"^--x: thing .* is a directory, not a file$"):
        check_given_file(tmp_path, "thing", Bad, "--x")
    with pytest.raises(Bad, match="thing is empty: name a file"):
        check_given_file(" ", "thing", Bad, "--x")
