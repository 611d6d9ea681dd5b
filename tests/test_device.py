"""The training device and its backend switches, on CPU (CUDA through what does not need a GPU)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from revseg.device import resolve_device, set_deterministic, set_tf32, tf32_flags
from revseg.errors import ConfigError


@pytest.fixture
def restore_backends():
    """Put the global switches back: they outlive the test in this process."""
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    tf32 = tf32_flags()
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2:]
    set_tf32(tf32["cudnn_conv"])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic_sets_cublas_workspace_and_cudnn(
    monkeypatch, restore_backends, caplog, device
):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    with caplog.at_level(logging.WARNING):
        set_deterministic(torch.device(device))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    # on CUDA the kernels without a deterministic version are named once
    named = [r for r in caplog.records if "trilinear upsampling backward" in r.getMessage()]
    assert len(named) == (device == "cuda")


def test_deterministic_keeps_the_users_cublas_setting(monkeypatch, restore_backends):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_deterministic(torch.device("cpu"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_gpu_beyond_the_machines_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda:2 but this machine has 2 GPU"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match=r"^trainer.device='tpu'"):
        resolve_device("tpu")


def tiny_run(tmp_path, data_root, *overrides: str) -> tuple[dict, torch.nn.Module]:
    from revseg.training.checkpoint import load_checkpoint
    from revseg.training.trainer import train

    from conftest import TINY, compose_train

    cfg = compose_train(
        *TINY,
        f"data.root={data_root}",
        f"paths.output_dir={tmp_path}",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.plan_memory=false",
        "~logger",
        *overrides,
    )
    summary = train(cfg)
    return summary, load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]


def test_channels_last_and_cudnn_benchmark(tmp_path, tiny_data_root, restore_backends):
    _, plain = tiny_run(tmp_path / "a", tiny_data_root)
    summary, last = tiny_run(
        tmp_path / "b", tiny_data_root, "trainer.channels_last=true", "trainer.cudnn_benchmark=true"
    )
    assert torch.backends.cudnn.benchmark
    assert summary["epochs_completed"] == 1
    # the same training in another memory layout: the same weights up to float32 rounding
    for key, value in plain.items():
        assert torch.allclose(last[key], value, rtol=1e-4, atol=1e-6), key


def test_tf32_is_off_unless_asked_and_recorded(tmp_path, tiny_data_root, restore_backends):
    """PyTorch's default runs float32 cuDNN convolutions in TF32; revseg's does not, and the
    flags in force are in summary.json (issue 19, item 5)."""
    set_tf32(True)  # as a fresh process starts for convolutions
    summary, _ = tiny_run(tmp_path / "a", tiny_data_root)
    assert summary["tf32"] == {"cudnn_conv": False, "cuda_matmul": False}
    assert tf32_flags() == {"cudnn_conv": False, "cuda_matmul": False}
    summary, _ = tiny_run(tmp_path / "b", tiny_data_root, "trainer.tf32=true")
    assert summary["tf32"] == {"cudnn_conv": True, "cuda_matmul": True}


def test_channels_last_stores_model_and_batches_channels_last(tiny_data_root, tmp_path):
    from hydra.utils import instantiate

    from revseg.training.trainer import Trainer

    from conftest import TINY, compose_train

    cfg = compose_train(
        *TINY,
        f"data.root={tiny_data_root}",
        f"paths.output_dir={tmp_path}",
        "trainer.channels_last=true",
    )
    model = instantiate(cfg.model, _convert_="all")
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    trainer = Trainer(
        cfg, model, None, None, optimizer, None, {}, None, tmp_path, torch.device("cpu")
    )
    conv = next(
        m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not conv.weight.is_contiguous()
    batch = trainer._to_device(torch.randn(1, 4, 8, 8, 8))
    assert batch.is_contiguous(memory_format=torch.channels_last_3d) and not batch.is_contiguous()


def compiled_trainer(tmp_path, *overrides: str):
    from hydra.utils import instantiate

    from revseg.training.trainer import Trainer

    from conftest import TINY, compose_train

    cfg = compose_train(*TINY, f"paths.output_dir={tmp_path}", *overrides)
    torch.manual_seed(0)
    net = instantiate(cfg.model, _convert_="all")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    device = torch.device("cpu")
    return Trainer(cfg, net, None, None, optimizer, None, {}, None, tmp_path, device), net


def test_compile_keeps_memory_saving_and_gradients(tmp_path):
    # torch.compile on prev_unet: the reversible sequences' autograd Functions break the graph
    # and run eagerly, so they still keep only their outputs (aot_eager: dynamo and AOTAutograd
    # as inductor sees them, without generating C++, which takes minutes here)
    import copy

    from revseg.memory import SavedTensorsCounter

    trainer, net = compiled_trainer(tmp_path, "trainer.compile=aot_eager")
    eager = copy.deepcopy(net)
    assert type(trainer.wrapped).__name__ == "OptimizedModule"
    x = torch.randn(1, 4, 16, 16, 16)
    saved, grads = [], []
    for fn, module in ((trainer.wrapped, net), (eager, eager)):
        with SavedTensorsCounter(exclude=module.parameters()) as counter:
            loss = fn(x).square().mean()
        loss.backward()
        saved.append(counter.bytes)
        grads.append([p.grad for p in module.parameters()])
    assert saved[0] <= 1.01 * saved[1], saved
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_compile_failure_is_one_line_naming_the_model(tmp_path):
    from torch._dynamo import list_backends, register_backend

    from revseg.errors import TrainingError

    if "revseg_test_failing" not in list_backends(exclude_tags=()):

        @register_backend
        def revseg_test_failing(graph, example_inputs):  # a backend that fails, as one could
            raise RuntimeError("cannot compile this graph")

    trainer, _ = compiled_trainer(tmp_path, "trainer.compile=revseg_test_failing")
    with pytest.raises(TrainingError) as info, trainer._compile_errors():
        trainer.wrapped(torch.randn(1, 4, 8, 8, 8))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "trainer.compile=revseg_test_failing: torch.compile failed on the prev_unet model "
        "(BackendCompilerFailed: backend='revseg_test_failing' raised:"
    )
    assert message.endswith("train without it (trainer.compile=false)")


def test_compile_needs_cuda(tmp_path, tiny_data_root):
    with pytest.raises(ConfigError, match=r"^trainer.compile=true needs trainer.device=cuda"):
        tiny_run(tmp_path, tiny_data_root, "trainer.compile=true")
