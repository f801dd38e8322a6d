"""Atomic writes and the distill stage's checkpoints, on real files and a real Accelerator."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from distill.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from distill.errors import DistillError
from distill.io import (atomic_write, load_tensors, read_json, remove_stale_temporaries, replace_dir, save_tensors,
                       stream_tensors, write_json)


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"version": 1})

    def broken(temp):
        temp.write_text('{"version": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert read_json(target) == {"version": 1}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json"]


def test_a_streamed_safetensors_file_reads_back_bit_for_bit_with_the_library(tmp_path):
    """Tensors written one at a time under a header made first: every dtype a student holds, a 0-d
    and an empty tensor, odd sizes (so the header's padding and the offsets are exercised)."""
    torch.manual_seed(0)
    tensors = {"weight": torch.randn(5, 7), "half": torch.randn(3, 3).bfloat16(), "mask": torch.rand(13) > 0.5,
               "scale": torch.tensor(0.25), "ids": torch.randint(0, 1000, (3,)), "empty": torch.zeros(0, 4),
               "bits": torch.randint(0, 255, (9,), dtype=torch.uint8)}
    layout = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    stream_tensors(tmp_path / "streamed.safetensors", layout, iter(tensors.values()), metadata={"format": "pt"})
    back = load_tensors(tmp_path / "streamed.safetensors")
    assert list(back) == list(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    # a tensor that does not match the header fails the write and leaves nothing behind
    with pytest.raises(ValueError, match="mask: a torch.float32 tensor"):
        wrong = [tensor.float() if name == "mask" else tensor for name, tensor in tensors.items()]
        stream_tensors(tmp_path / "wrong.safetensors", layout, iter(wrong))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["streamed.safetensors"]


def test_corrupt_files_are_named_in_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DistillError, match=r"corrupt JSON file .*bad.json"):
        read_json(tmp_path / "bad.json")
    tensors = {"a": torch.randn(3, 5)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    assert torch.equal(load_tensors(tmp_path / "t.safetensors")["a"], tensors["a"])
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DistillError, match=r"corrupt safetensors file .*t.safetensors"):
        load_tensors(tmp_path / "t.safetensors")
    with pytest.raises(DistillError, match="missing file"):
        load_tensors(tmp_path / "absent.safetensors")


def test_replace_dir_swaps_a_finished_dir_in_whole(tmp_path):
    old, new = tmp_path / "stage", tmp_path / "stage.partial"
    old.mkdir()
    (old / "a.txt").write_text("old")
    new.mkdir()
    (new / "b.txt").write_text("new")
    replace_dir(new, old)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["stage"]
    assert [path.name for path in old.iterdir()] == ["b.txt"]


def _trained_pair(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, optimizer


def _step(model, optimizer):
    loss = model(torch.randn(8, 6)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoints_keep_the_newest_and_restore_weights_optimizer_and_rng(tmp_path):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model, optimizer = accelerator.prepare(*_trained_pair(0))
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None
    for step in (1, 2, 3):
        _step(model, optimizer)
        save_checkpoint(accelerator, root, step, keep=2)
    assert sorted(path.name for path in root.iterdir()) == ["latest.json", "step_00000002", "step_00000003"]
    assert latest_checkpoint(root) == root / "step_00000003"
    expected_weight = model.weight.detach().clone()
    _step(model, optimizer)
    expected_next = model.weight.detach().clone()

    # a fresh process's model and optimizer, resumed from the checkpoint, take the same next step
    resumed = Accelerator(cpu=True, mixed_precision="no")
    model2, optimizer2 = resumed.prepare(*_trained_pair(1))
    load_checkpoint(resumed, latest_checkpoint(root))
    assert torch.equal(model2.weight, expected_weight)
    _step(model2, optimizer2)
    assert torch.equal(model2.weight, expected_next)


def test_a_corrupt_checkpoint_or_pointer_is_refused_in_one_line(tmp_path):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model, optimizer = accelerator.prepare(*_trained_pair(0))
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, keep=1)
    weights = next((root / "step_00000001").glob("model*.safetensors"))
    intact = weights.read_bytes()
    weights.write_bytes(intact[:100])
    with pytest.raises(DistillError, match=r"step_00000001 is damaged: .*model.safetensors is 100 bytes") as refusal:
        load_checkpoint(accelerator, latest_checkpoint(root))
    assert "\n" not in str(refusal.value)
    # the same size with other bytes (safetensors would load them as they are)
    weights.write_bytes(intact[:-8] + bytes(byte ^ 0xFF for byte in intact[-8:]))
    with pytest.raises(DistillError, match=r"model.safetensors does not match the sha256 its checksums.json recorded"):
        load_checkpoint(accelerator, latest_checkpoint(root))
    weights.write_bytes(intact)
    load_checkpoint(accelerator, latest_checkpoint(root))
    (root / "step_00000001" / "checksums.json").unlink()  # a checkpoint that cannot say what it held
    with pytest.raises(DistillError, match="records no checksums"):
        load_checkpoint(accelerator, latest_checkpoint(root))
    write_json(root / "latest.json", {"name": "step_00000009", "step": 9})
    with pytest.raises(DistillError, match="step_00000009, which does not exist"):
        latest_checkpoint(root)
    write_json(root / "latest.json", ["step_00000001"])  # valid JSON, wrong shape
    with pytest.raises(DistillError, match="corrupt checkpoint pointer .*latest.json"):
        latest_checkpoint(root)


def test_a_checkpoint_that_fails_to_write_leaves_no_temporary_and_keeps_the_older_one(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model, optimizer = accelerator.prepare(*_trained_pair(0))
    root = tmp_path / "checkpoints"
    save_checkpoint(accelerator, root, 1, keep=2)

    def full_disk(directory, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(accelerator, "save_state", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(accelerator, root, 2, keep=2)
    assert sorted(path.name for path in root.iterdir()) == ["latest.json", "step_00000001"]
    assert latest_checkpoint(root).name == "step_00000001"


def test_stale_temporaries_are_found_and_removed_and_nothing_else(tmp_path):
    keep = [tmp_path / "config.yaml", tmp_path / "distill" / "metrics.jsonl", tmp_path / "distill" / ".hidden"]
    stale = [tmp_path / ".config.yaml.tmp123", tmp_path / "distill" / ".metrics.jsonl.tmp9",
             tmp_path / "export" / "hf" / ".tmpAb3xZ9"]  # the safetensors library's own temp name
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / "distill" / "checkpoints" / ".step_00000004.tmp").mkdir(parents=True)
    (tmp_path / "distill" / "checkpoints" / ".step_00000004.tmp" / "model.safetensors").write_text("half")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale + [tmp_path / "distill" / "checkpoints" / ".step_00000004.tmp"])
    assert all(path.exists() for path in keep) and not any(path.exists() for path in stale)
