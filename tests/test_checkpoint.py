"""Weight loading from foreign formats, safe refusal of pickles, and crash-proof run checkpoints."""

import json
import pickle
import warnings
import threading

import pytest
import torch
from torch import nn

from dfkd.checkpoint import CheckpointManager, verify_checkpoint
from dfkd.errors import CheckpointError
from dfkd.weights import load_state_dict_file, load_weights, read_model_metadata, save_model


def _net(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, classes))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel"])
def test_foreign_formats_load(tmp_path, wrap):
    source = _net()
    state = source.state_dict()
    if wrap == "dataparallel":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 91.7}
    elif wrap == "plain":
        obj = state
    else:
        obj = {wrap: state, "epoch": 3}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    target = _net()
    load_weights(target, path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_mismatch_names_the_keys(tmp_path):
    state = _net(classes=10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["1.running_var"]
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(_net(classes=3), path, what="teacher checkpoint")
    message = str(err.value)
    assert "teacher checkpoint" in message
    assert "missing keys: 1.running_var" in message
    assert "unexpected keys: extra.weight" in message
    assert "3.weight: file (10, 8) vs model (3, 8)" in message


class _Payload:
    def __reduce__(self):
        return (open, ("/tmp/dfkd-pwned-marker", "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_with_a_payload_is_refused_and_never_runs(tmp_path):
    marker = "/tmp/dfkd-pwned-marker"
    import os

    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": _Payload()}, fh)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_state_dict_file(path)
    assert not os.path.exists(marker)


class _Foreign:
    """A class a checkpoint might pickle: refused by name, never run."""


def test_a_refused_pickle_names_the_object_and_says_how_to_convert_a_trusted_file_without_torchs_advice(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Foreign()}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as error:
            load_state_dict_file(path)
    message = str(error.value)
    assert "_Foreign" in message and "trust" in message and "teacher.safetensors" in message
    assert "will likely succeed" not in message and "\x1b" not in message, "none of torch's own advice"
    assert caught == [], "no warning leaks out"


@pytest.mark.parametrize("damage", ["truncated", "empty", "junk"])
def test_a_damaged_checkpoint_says_so_with_its_path_and_size(tmp_path, damage):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(64, 64)}, good)
    data = good.read_bytes()
    path = tmp_path / "bad.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "junk": b"not a checkpoint " * 8}[damage])
    with pytest.raises(CheckpointError) as error:
        load_state_dict_file(path)
    message = str(error.value)
    assert str(path) in message and f"{path.stat().st_size:,} bytes" in message
    assert "truncated or is not a PyTorch checkpoint" in message


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pth")


def test_safetensors_round_trip_with_metadata(tmp_path):
    model = _net()
    save_model(model, tmp_path / "m.safetensors", {"arch": "tiny", "mean": [0.5]})
    assert read_model_metadata(tmp_path / "m.safetensors") == {"arch": "tiny", "mean": [0.5]}
    other = _net()
    load_weights(other, tmp_path / "m.safetensors")
    assert torch.equal(other[3].weight, model[3].weight)
    assert not list(tmp_path.glob(".*tmp*")), "temporary files must be renamed away"


def _save(manager: CheckpointManager, step: int, value: float) -> None:
    model = nn.Linear(2, 2)
    nn.init.constant_(model.weight, value)
    manager.save(step, {"student": model}, {"run": {"step": step}}, {"torch": torch.get_rng_state()})


def test_checkpoints_keep_the_last_k_and_reload(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        _save(manager, step, float(step))
    assert [p.name for p in manager.complete()] == ["step_00000020", "step_00000030"]
    models, state, local = CheckpointManager.load(manager.latest())
    assert state == {"run": {"step": 30}}
    assert torch.all(models["student"]["weight"] == 30.0)
    assert torch.equal(local["torch"], torch.get_rng_state())


def test_a_full_disk_is_a_clear_error_and_leaves_the_published_checkpoints_as_they_were(tmp_path, monkeypatch):
    import errno

    import dfkd.checkpoint as checkpoint_module

    manager = CheckpointManager(tmp_path, keep=2)
    _save(manager, 10, 10.0)
    write = checkpoint_module.atomic_write_bytes

    def full_disk(path, data):
        if path.name == "state.pt":  # after the process and model files went in
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data)

    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", full_disk)
    with pytest.raises(CheckpointError) as info:
        _save(manager, 20, 20.0)
    message = str(info.value)
    assert "step 20" in message and "No space left on device" in message
    assert "step_00000010" in message and "train.resume=auto" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010"], "the partial folder is removed"
    assert verify_checkpoint(manager.latest()) is None


def test_each_process_gets_its_own_state_and_a_new_process_gets_rank_0s_with_a_warning(tmp_path):
    manager = CheckpointManager(tmp_path)
    model = nn.Linear(2, 2)
    barrier = threading.Barrier(2)  # two threads play the two processes of a run, with their barrier

    def save(rank: int) -> None:
        manager.save(5, {"student": model}, {"run": {}}, {"shard": torch.full((2,), float(rank))},
                     rank=rank, is_main=rank == 0, barrier=barrier.wait)

    threads = [threading.Thread(target=save, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert verify_checkpoint(manager.latest()) is None, "both processes' files are in the manifest"
    assert torch.equal(CheckpointManager.load(manager.latest(), rank=1)[2]["shard"], torch.ones(2))
    with pytest.warns(UserWarning, match="saved by fewer processes"):
        local = CheckpointManager.load(manager.latest(), rank=2)[2]
    assert torch.equal(local["shard"], torch.zeros(2))


def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    _save(manager, 1, 1.0)
    _save(manager, 2, 2.0)
    newest = manager.complete()[-1] / "student.safetensors"
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="truncated"):
        assert manager.latest().name == "step_00000001"
    with pytest.raises(CheckpointError, match="not usable"):
        CheckpointManager.load(manager.complete()[-1])


def test_a_corrupted_byte_is_detected(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 5, 1.0)
    state_file = manager.complete()[-1] / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    assert "SHA-256" in verify_checkpoint(manager.complete()[-1])


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 1, 1.0)
    crashed = tmp_path / ".tmp-step_00000002"  # what a crash mid-save leaves behind
    crashed.mkdir()
    (crashed / "state.pt").write_bytes(b"partial")
    assert manager.latest().name == "step_00000001"
    unpublished = tmp_path / "step_00000003"  # published without a manifest: never valid
    unpublished.mkdir()
    with pytest.warns(UserWarning, match="manifest"):
        assert manager.latest().name == "step_00000001"
    _save(manager, 2, 2.0)  # the next save replaces the leftover temp folder
    assert json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())["step"] == 2
