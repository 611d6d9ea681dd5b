"""DistributedDataParallel: 2 gloo processes on CPU match 1 process on the combined batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from revseg.models.prev_unet import PartiallyReversibleUNet
from revseg.training.checkpoint import load_checkpoint
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
    dist.destroy_process_group()


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
        "error: trainer.strategy=ddp needs torchrun: torchrun --nproc_per_node=N train.py trainer=ddp ..."
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

    from revseg.training.distributed import DistInfo, shard_loader

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
