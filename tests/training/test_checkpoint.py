"""Checkpoints: RNG states that any ``map_location`` leaves intact, per GPU and per rank."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from revseg.training.checkpoint import (
    load_checkpoint,
    restore_rng,
    rng_state,
    save_atomic,
    set_rng_state,
    with_checksum,
)
from revseg.training.distributed import DistInfo, gather_objects


def draws() -> tuple:
    """One number from each global generator a training run draws from."""
    return (random.random(), np.random.rand(), torch.rand(1).item())  # noqa: NPY002


@pytest.mark.parametrize("map_location", ["cpu", "meta"])
def test_rng_states_survive_any_map_location(tmp_path, map_location):
    # a resume on CUDA loaded with map_location=<the GPU>, which moved the saved CPU byte
    # tensors off the CPU; "meta" stands for any device that is not the CPU
    torch.manual_seed(3)
    state = rng_state()
    expected = draws()
    checkpoint = with_checksum({"model": {}, "config": "", "rng": state})
    path = save_atomic(checkpoint, tmp_path / "last.pt")
    loaded = load_checkpoint(path, map_location=map_location)
    draws()
    set_rng_state(loaded["rng"])
    assert draws() == expected


class FakeCuda:
    """The calls ``rng_state``/``set_rng_state`` make on ``torch.cuda``, on a 2-GPU machine."""

    def __init__(self) -> None:
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
        self.set: list[tuple[int, torch.Tensor]] = []

    def get_rng_state(self, device):
        return self.states[torch.device(device).index]

    def set_rng_state(self, state, device):
        assert state.device.type == "cpu"
        self.set.append((torch.device(device).index, state))

    def get_rng_state_all(self):
        raise AssertionError("every GPU's state must not be saved")

    def set_rng_state_all(self, states):
        raise AssertionError("every GPU's state must not be restored")


def test_only_the_training_gpus_state_is_saved_and_restored(monkeypatch):
    fake = FakeCuda()
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    state = rng_state(torch.device("cuda", 1))
    assert isinstance(state["cuda"], bytes) and set(state["cuda"]) == {1}
    # resumed on a one-GPU machine: the state goes to the device training runs on
    set_rng_state(state, torch.device("cuda", 0))
    assert [index for index, _ in fake.set] == [0]
    assert torch.equal(fake.set[0][1], fake.states[1])
    # a CPU run saves and restores no CUDA state even where a GPU exists
    assert "cuda" not in rng_state(torch.device("cpu"))


def _rank_worker(rank: int, init_file: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    info = DistInfo(rank, 2)
    torch.manual_seed(0)
    for _ in range(rank + 1):  # the ranks' streams part (data, dropout masks differ per rank)
        draws()
    states = gather_objects(rng_state(), info)
    if rank == 0:
        checkpoint = {"model": {}, "config": "", "rng": states[0], "rng_ranks": states}
        save_atomic(with_checksum(checkpoint), path)
    expected = draws()
    dist.barrier()
    assert restore_rng(load_checkpoint(path), rank, 2)
    assert draws() == expected, f"rank {rank} did not resume its own random stream"
    dist.destroy_process_group()


def test_every_rank_resumes_its_own_random_stream(tmp_path):
    mp.spawn(
        _rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "last.pt")), nprocs=2, join=True
    )


def test_another_world_size_restores_rank_0s_states():
    torch.manual_seed(0)
    states = [rng_state(), rng_state()]
    expected = draws()
    assert not restore_rng({"rng": states[0], "rng_ranks": states}, rank=1, world_size=3)
    assert draws() == expected
    assert restore_rng({"rng": states[0], "rng_ranks": None})


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    """4 KiB of flipped bits inside a tensor's bytes (an Adam moment of 1.1e11 on resume):
    the checksum written with the checkpoint catches it; a file without a checksum is not one
    of revseg's checkpoints and is refused too."""
    from revseg.errors import DataError

    weights = torch.arange(4096, dtype=torch.float32)
    state = {"model": {"w": weights}, "config": "model: {}", "optimizer": {"m": weights * 2}}
    path = save_atomic(with_checksum(state), tmp_path / "last.pt")
    assert torch.equal(load_checkpoint(path)["model"]["w"], weights)
    data = bytearray(path.read_bytes())
    start = data.find(weights.numpy().tobytes()[:64])  # the storage of "w" in the zip
    assert start > 0
    for i in range(start + 1024, start + 1024 + 4096):
        data[i] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"^checkpoint {path} is damaged: "):
        load_checkpoint(path)
    unchecked = save_atomic(state, tmp_path / "unchecked.pt")
    with pytest.raises(
        DataError, match=rf"^not a revseg checkpoint \(no sha256 checksum entry\): {unchecked}$"
    ):
        load_checkpoint(unchecked)
