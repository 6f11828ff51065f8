"""`train.device`: auto picks CUDA when present, cuda without a GPU stops with one line, and
Ray is told the GPU share of each virtual phone."""

from __future__ import annotations

import pytest
import torch

from fedmilm.adapters import build_adapter_space
from fedmilm.training.device import DeviceError, base_dtype, phones_gpu_share, resolve_device
from fedmilm.training.loss import per_example_loss
from tests.conftest import tiny_config


def test_auto_follows_what_the_machine_has():
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("cuda", cuda_available=True) == "cuda"


def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", cuda_available=False)
    assert "\n" not in str(err.value) and "train.device=cuda" in str(err.value)
    with pytest.raises(DeviceError):
        resolve_device("tpu", cuda_available=True)


def test_the_base_is_bf16_on_cuda_only():
    assert base_dtype("float32", "cuda") == "bfloat16"
    assert base_dtype("float32", "cpu") == "float32"
    assert base_dtype("bfloat16", "cpu") == "bfloat16"


def test_ray_gets_a_gpu_share_per_phone_only_on_cuda():
    assert phones_gpu_share("cpu", 0.25) == 0.0
    assert phones_gpu_share("cuda", 0.25) == 0.25
    assert phones_gpu_share("cuda", 0.0) == 1.0  # unset: one phone per GPU, never unaccounted


def test_a_space_on_a_device_returns_cpu_float32_state():
    """What travels and what is stored is CPU float32 wherever the phone computed; batches
    follow the model to its device. (The CPU stands in for a GPU here: the same code path
    moves tensors; BENCHMARKS.md has the GPU runs when a GPU was available.)"""
    cfg = tiny_config()
    space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=0, device="cpu")
    state = space.state(space.global_keys)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_phone_trains_on_cuda():
    cfg = tiny_config()
    space = build_adapter_space(cfg.model, cfg.lora, mode="dual", seed=0, device="cuda")
    from fedmilm.data import encode_all, load_user
    from fedmilm.data.chat import batches

    data = load_user(cfg.data, user=0, seed=0)
    batch = batches(encode_all(space.tokenizer, data.train, 64), batch_size=4,
                    pad_id=space.tokenizer.pad_token_id)[0]
    loss = per_example_loss(space.model, batch)  # a CPU batch: moved to the model's GPU
    assert loss.device.type == "cuda"
    assert all(v.device.type == "cpu" for v in space.state(space.global_keys).values())


def test_the_simulation_asks_ray_for_the_gpu_share_and_sizes_its_window():
    from fedmilm.cli.simulate import backend_config, with_in_flight

    gpu = tiny_config("train.device=cuda", "federation.gpus_per_client=0.25")
    assert backend_config(gpu)["client_resources"]["num_gpus"] == 0.25
    cpu = tiny_config("train.device=cpu", "federation.gpus_per_client=0.25")
    assert backend_config(cpu)["client_resources"]["num_gpus"] == 0.0
    sized = with_in_flight(tiny_config("federation.total_cpus=8", "federation.cpus_per_client=2"))
    assert sized.federation.max_in_flight == 16  # 4 per worker, 4 workers
    chosen = tiny_config("federation.max_in_flight=3")
    assert with_in_flight(chosen).federation.max_in_flight == 3
