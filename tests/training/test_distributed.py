"""DistributedDataParallel: 2 gloo processes on CPU match 1 process on the combined batch."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from revseg.errors import ConfigError
from revseg.models.prev_unet import PartiallyReversibleUNet
from revseg.training.checkpoint import load_checkpoint
from revseg.training.distributed import (
    DistInfo,
    end_process_group,
    init_distributed,
    local_cuda_index,
    training_device,
)
from revseg.training.losses import RegionDiceLoss

from conftest import REPO, TINY, TINY_VIDEO

STEPS = 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return PartiallyReversibleUNet(channels=(8, 16, 24), norm_groups=2, encoder_depth=2).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(2, 4, 8, 8, 8, generator=g, dtype=torch.float64),
            (torch.rand(2, 3, 8, 8, 8, generator=g) > 0.7).double(),
        )
        for _ in range(STEPS)
    ]


def train_steps(model, data, rank: int | None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = RegionDiceLoss()
    for image, label in data:
        if rank is not None:  # this rank's half of the combined batch
            image, label = image[rank : rank + 1], label[rank : rank + 1]
        optimizer.zero_grad()
        loss_fn(model(image), label).backward()
        optimizer.step()


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    train_steps(model, batches(), rank)
    if rank == 0:
        torch.save({k: v.clone() for k, v in model.module.state_dict().items()}, out)
    del model  # freed while the group lives (a rank hung in CI freeing it after)
    end_process_group()


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    single = make_model()
    train_steps(single, batches(), None)
    ddp_state = torch.load(out, weights_only=True)
    for key, value in single.state_dict().items():
        assert torch.allclose(ddp_state[key], value, rtol=1e-9, atol=1e-12), key
    # and the steps did move the weights
    assert not torch.equal(make_model().state_dict()["stem.weight"], ddp_state["stem.weight"])


def run_torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 train.py trainer=ddp <args>``."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", "trainer=ddp", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_torchrun_trains_end_to_end(tmp_path, tiny_data_root):
    run = tmp_path / "run"
    proc = run_torchrun(*TINY, f"data.root={tiny_data_root}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 1
    assert summary["global_step"] == 2  # 3 training cases over 2 ranks: 2 steps each
    assert 0.0 <= summary["final_metrics"]["val/dice_mean"] <= 1.0
    assert (run / "checkpoints" / "best.pt").is_file()
    # each rank's random streams, for a resume on as many processes
    assert len(load_checkpoint(run / "checkpoints" / "last.pt")["rng_ranks"]) == 2


def test_ddp_without_torchrun_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "trainer=ddp", f"hydra.run.dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.strategy=ddp needs torchrun: "
        "torchrun --nproc_per_node=N train.py trainer=ddp ..."
    ]


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.slow
def test_torchrun_hyperbolic_ranks_grow_together(tmp_path):
    run = tmp_path / "run"
    proc = run_torchrun(
        "model=hyperbolic_blr",
        *TINY_VIDEO,
        "callbacks.rank_growth.threshold=0.5",
        "trainer.max_epochs=3",
        "trainer.progress_bar=false",
        f"data.root={tmp_path / 'data'}",
        f"hydra.run.dir={run}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks grew at the same epoch and training went on after re-wrapping DDP
    output = (proc.stdout + proc.stderr).splitlines()
    grown = [line for line in output if "block rank [6, 4, 6] -> [6, 8, 6]" in line]
    assert len(grown) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 3 and summary["ranks"]["current"] == [6, 8, 6]


def test_sharded_loader_augments_anew_per_epoch_and_rank():
    # identical items: what differs between the streams is the random augmentation only
    import numpy as np
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandGaussianNoised

    from revseg.training.distributed import shard_loader

    dataset = Dataset([{"x": np.zeros((1, 4), np.float32)}] * 4, RandGaussianNoised("x", prob=1.0))

    def stream(epoch: int, rank: int) -> torch.Tensor:
        # as the data modules build it: seeded by seed + epoch, one worker process
        generator = torch.Generator().manual_seed(7 + epoch)
        loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=1, generator=generator)
        sharded = shard_loader(loader, DistInfo(rank, 2), seed=7, epoch=epoch, shuffle=True)
        assert type(sharded) is DataLoader
        return torch.cat([batch["x"] for batch in sharded])

    first = stream(0, 0)
    assert not torch.allclose(first, stream(1, 0)), "the same augmentation every epoch"
    assert not torch.allclose(first, stream(0, 1)), "the same augmentation on every rank"
    assert torch.equal(first, stream(0, 0)), "an epoch resumed draws another stream"


# -- decisions, one-process DDP, the GPU of each rank --------------------------------------------

HALF_UP = math.nextafter(0.5, 1.0)  # 0.5 and the next double: metrics disagreeing in the last bit


def _decision_worker(rank: int, init_file: str, run: str, data_root: str) -> None:
    from trainer_builder import make_trainer

    from revseg.training.callbacks import EarlyStopping

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
        timeout=timedelta(seconds=30),
    )  # fmt: skip
    try:
        trainer = make_trainer(
            Path(run),
            Path(data_root),
            "trainer.max_epochs=4",
            callbacks={"early_stopping": EarlyStopping(window=1, patience=1)},
            dist_info=DistInfo(rank, 2, 0, "gloo"),
        )
        # epoch 2: rank 1 sees an improvement that rank 0 does not
        dice = iter([0.5, 0.5 if rank == 0 else HALF_UP, 0.5, 0.5])
        trainer.train_epoch = lambda: {"train/loss": 1.0}
        trainer.validate = lambda: {"val/dice_mean": next(dice), "val/loss": 1.0}
        trainer.fit()
        decided = {"epoch": trainer.epoch, "stopped": trainer.should_stop, "best": trainer.best}
        Path(run, f"rank{rank}.json").write_text(json.dumps(decided))
        del trainer  # freed while the group lives, the ranks leave together: end_process_group
    finally:
        end_process_group()


def test_ranks_take_rank_0s_checkpoint_and_early_stopping_decisions(tmp_path, tiny_data_root):
    run = tmp_path / "run"
    mp.spawn(
        _decision_worker,
        args=(str(tmp_path / "init"), str(run), str(tiny_data_root)),
        nprocs=2,
        join=True,
    )
    decided = [json.loads((run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert decided[0] == decided[1]
    # rank 0's view: no improvement at epoch 2, so the best is epoch 1's and training stops
    assert decided[0] == {
        "epoch": 2,
        "stopped": True,
        "best": {"name": "val/dice_mean", "value": 0.5, "epoch": 1},
    }
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 1


def _one_process_worker(rank: int, port: int, out: str, data_root: str) -> None:
    from torch.nn.parallel import DistributedDataParallel
    from trainer_builder import make_trainer

    # what a one-process torchrun sets
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    info = init_distributed("ddp", "auto", "cpu")
    try:
        trainer = make_trainer(Path(out).parent, Path(data_root), dist_info=info)
        batch = next(iter(trainer.data.train_dataloader(seed=0)))
        loss = trainer.training_step(batch["image"], batch["label"])
        result = {
            "enabled": info.enabled,
            "backend": info.backend,
            "ddp": isinstance(trainer.wrapped, DistributedDataParallel),
            "loss": float(loss),
        }
        Path(out).write_text(json.dumps(result))
        del trainer
    finally:
        end_process_group()


def test_one_process_ddp_wraps_the_model(tmp_path, tiny_data_root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.spawn(_one_process_worker, args=(port, str(out), str(tiny_data_root)), nprocs=1, join=True)
    result = json.loads(out.read_text())
    assert result["enabled"] and result["backend"] == "gloo" and result["ddp"]
    assert math.isfinite(result["loss"])


def test_strategy_single_stays_undistributed():
    info = init_distributed("single")
    assert not info.enabled and info.backend is None


class CudaCalls:
    """``torch.cuda.set_device`` and ``device_count`` stand-ins: ``count`` visible GPUs."""

    def __init__(self, monkeypatch, count: int) -> None:
        self.current: list[torch.device | int] = []
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", self.current.append)


@pytest.mark.parametrize(("count", "local_rank", "index"), [(1, 0, 0), (1, 3, 0), (4, 2, 2)])
def test_each_local_rank_gets_a_gpu_it_sees(monkeypatch, count, local_rank, index):
    CudaCalls(monkeypatch, count)
    assert local_cuda_index(local_rank) == index


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    CudaCalls(monkeypatch, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK=2 but this process sees 2 GPU\(s\) "):
        local_cuda_index(2)


def test_ddp_on_a_task_that_sees_one_gpu_uses_it(monkeypatch):
    # e.g. a scheduler that gives each of 4 tasks its own GPU through CUDA_VISIBLE_DEVICES
    cuda = CudaCalls(monkeypatch, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    info = init_distributed("ddp", "auto", "cuda")
    assert cuda.current == [0]
    assert training_device(torch.device("cuda"), info) == torch.device("cuda", 0)


def test_an_explicit_gpu_becomes_the_current_device(monkeypatch):
    cuda = CudaCalls(monkeypatch, 2)
    # trainer.device=cuda:1 without DDP: pinned memory and synchronize() go to cuda:1, not 0
    assert training_device(torch.device("cuda", 1), DistInfo()) == torch.device("cuda", 1)
    assert cuda.current == [torch.device("cuda", 1)]
    cuda.current.clear()
    assert training_device(torch.device("cpu"), DistInfo()) == torch.device("cpu")
    assert training_device(torch.device("cuda"), DistInfo()) == torch.device("cuda")
    assert cuda.current == []
