import pickle

import pytest
import torch

from flip import checkpoint
from flip.checkpoint import atomic_torch_save
from flip.training.checkpoint_io import AtomicCheckpointIO


class NotATensor:
    pass


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def test_checkpoints_load_with_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(
        {"state_dict": {"w": torch.arange(3)}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "a.ckpt"
    )
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["hyper_parameters"] == {"lr": 0.1} and loaded["state_dict"]["w"].tolist() == [0, 1, 2]
    torch.save({"evil": NotATensor()}, tmp_path / "b.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        io.load_checkpoint(tmp_path / "b.ckpt", weights_only=False)  # the caller cannot opt out
