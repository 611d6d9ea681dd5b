"""The training step: one host synchronisation per step, fp16 overflows counted as skipped."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_builder import make_trainer


class HostReads(TorchDispatchMode):
    """Records every read of a tensor's value on the host (``.item()``, ``float()``, ``bool()``:
    a synchronisation on CUDA), except of the tensors in ``ignore`` (the optimizer's step
    counters, which stay on the CPU on CUDA too)."""

    def __init__(self, ignore: list[torch.Tensor]) -> None:
        super().__init__()
        self.ignore = {t.data_ptr() for t in ignore}
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += args[0].data_ptr() not in self.ignore
        return func(*args, **(kwargs or {}))


def step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["step"] for s in optimizer.state.values() if torch.is_tensor(s.get("step"))]


def test_a_step_reads_the_device_once(tmp_path, tiny_data_root):
    trainer = make_trainer(tmp_path, tiny_data_root, "trainer.log_every_n_steps=2")
    batch = next(iter(trainer.data.train_dataloader(seed=0)))
    trainer.training_step(batch["image"], batch["label"])  # step 1 makes the optimizer's state
    reads = []
    for _ in range(2):
        with HostReads(step_counters(trainer.optimizer)) as mode:
            loss = trainer.training_step(batch["image"], batch["label"])
        reads.append(mode.reads)
    # the NaN policy's decision; at step 2 also the logged loss and gradient norm
    assert reads == [3, 1]
    assert torch.is_tensor(loss) and loss.ndim == 0 and not loss.requires_grad
    assert set(trainer.writer.scalars["train/loss_step"]) == {2}


def test_an_epoch_reads_its_losses_once(tmp_path, tiny_data_root):
    trainer = make_trainer(
        tmp_path, tiny_data_root, "trainer.limit_train_batches=3", "trainer.log_every_n_steps=100"
    )
    batches = list(trainer.data.train_dataloader(seed=0))  # read beforehand: the data pipeline
    trainer.data.train_dataloader = lambda **kwargs: batches  # reads values on the CPU
    trainer.training_step(batches[0]["image"], batches[0]["label"])  # the optimizer's state
    step, losses = trainer.accumulated_step, []
    trainer.accumulated_step = lambda *args: losses.append(step(*args)) or losses[-1]
    with HostReads(step_counters(trainer.optimizer)) as mode:
        logs = trainer.train_epoch()
    assert trainer.global_step == 4 and mode.reads == 3 + 1  # one per step, the mean
    assert logs["train/loss"] == sum(float(loss) for loss in losses) / 3


def test_fp16_steps_the_grad_scaler_skips_are_counted(tmp_path, tiny_data_root, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_data_root, "trainer.precision=fp16")
    original = type(trainer).compute_loss
    overflow = [True]

    def compute_loss(self, logits, label, mask):
        # finite, but times the GradScaler's 65536 beyond float32: the gradients overflow
        return original(self, logits, label, mask) * (1e36 if overflow.pop() else 1.0)

    monkeypatch.setattr(type(trainer), "compute_loss", compute_loss)
    batch = next(iter(trainer.data.train_dataloader(seed=0)))
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    assert trainer.training_step(batch["image"], batch["label"]) is None
    assert (trainer.skipped_steps, trainer.global_step) == (1, 0)
    assert trainer.scaler.get_scale() == 2.0**15
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in a skipped step"
    overflow.append(False)
    assert trainer.training_step(batch["image"], batch["label"]) is not None
    assert (trainer.skipped_steps, trainer.global_step) == (1, 1)
