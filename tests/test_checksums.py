"""Checksums of stage dirs and checkpoints: every change to a recorded file is named, nothing else is."""

from __future__ import annotations

import errno
import os

import pytest
from safetensors import SafetensorError

from distill.run.checksums import damage, digest_tree
from distill.io import sha256_file, write_failure


@pytest.fixture
def stage_dir(tmp_path):
    """A dir like a finished stage's: files at two depths, of random bytes."""
    (tmp_path / "student").mkdir()
    for name, size in {"data.safetensors": 5000, "student/model.safetensors": 20000, "student/config.json": 300}.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    return tmp_path


def test_a_tree_records_every_file_by_relative_path_except_the_skipped_patterns(stage_dir):
    (stage_dir / "student" / "README.md").write_text("completed later")
    digests = digest_tree(stage_dir, skip=("*/README.md",))
    assert sorted(digests) == ["data.safetensors", "student/config.json", "student/model.safetensors"]
    entry = digests["student/model.safetensors"]
    assert entry == {"size": 20000, "sha256": sha256_file(stage_dir / "student" / "model.safetensors")}
    assert damage(stage_dir, digests, "its manifest") is None


@pytest.mark.parametrize("harm,expected", [
    ("flip", "does not match the sha256 its manifest recorded"),
    ("truncate", "is 12345 bytes where its manifest recorded 20000"),
    ("delete", "is missing"),
])
def test_each_kind_of_harm_to_a_recorded_file_is_named(stage_dir, harm, expected):
    digests = digest_tree(stage_dir)
    target = stage_dir / "student" / "model.safetensors"
    data = target.read_bytes()
    if harm == "flip":  # one bit in the middle: the size stays
        middle = len(data) // 2
        target.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    elif harm == "truncate":
        target.write_bytes(data[:12345])
    else:
        target.unlink()
    problem = damage(stage_dir, digests, "its manifest")
    assert problem is not None and str(target) in problem and expected in problem, problem


def test_checksums_that_are_absent_or_malformed_are_a_problem_never_a_pass(stage_dir):
    assert "records no checksums" in damage(stage_dir, None, "its manifest")
    assert "unreadable" in damage(stage_dir, {"data.safetensors": {"size": "5000"}}, "its manifest")
    assert "unreadable" in damage(stage_dir, ["data.safetensors"], "its manifest")


def test_a_full_disk_reported_in_words_by_safetensors_becomes_enospc(tmp_path):
    # safetensors removes its temp file before it raises, so free space alone cannot tell
    error = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                            'message: "No space left on device" })')
    failure = write_failure(error, tmp_path / "model.safetensors")
    assert isinstance(failure, OSError) and failure.errno == errno.ENOSPC
    assert failure.filename == str(tmp_path / "model.safetensors")
    other = SafetensorError("Error while serializing: header too large")
    assert write_failure(other, tmp_path / "model.safetensors") is other
