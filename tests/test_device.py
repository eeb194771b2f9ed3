"""Device and precision choice (dapt.device): both branches with made-up capabilities, the CPU branch for real."""

from __future__ import annotations

import logging

import pytest
import torch

from dapt.device import (
    Capabilities,
    choose_device_and_dtype,
    detect_capabilities,
    dtype_argument,
    input_device,
    load_kwargs,
)
from dapt.errors import UserInputError

A100S = Capabilities(gpu_names=("NVIDIA A100-SXM4-80GB",) * 2, bf16=True)
V100 = Capabilities(gpu_names=("Tesla V100-SXM2-32GB",), bf16=False)
NO_GPU = Capabilities()


def test_gpus_get_device_map_auto_and_bf16_where_supported():
    placement = choose_device_and_dtype("auto", capabilities=A100S)
    assert placement.device_map == "auto" and placement.dtype is torch.bfloat16
    assert placement.description == "CUDA (2 x NVIDIA A100-SXM4-80GB; device_map=auto), bfloat16"
    assert load_kwargs(placement)["device_map"] == "auto"
    assert choose_device_and_dtype("cuda", capabilities=A100S) == placement
    # a GPU without bfloat16 computes in float32; asking for bfloat16 there is refused
    assert choose_device_and_dtype("auto", capabilities=V100).dtype is torch.float32
    assert choose_device_and_dtype("auto", "float32", capabilities=A100S).dtype is torch.float32
    with pytest.raises(UserInputError, match="'bfloat16'.*Tesla V100"):
        choose_device_and_dtype("auto", "bfloat16", capabilities=V100)
    mixed = Capabilities(gpu_names=("NVIDIA A100", "Tesla V100"), bf16=False)
    assert choose_device_and_dtype(capabilities=mixed).description == \
        "CUDA (NVIDIA A100, Tesla V100; device_map=auto), float32"


def test_the_cpu_gets_float32_and_no_device_map():
    for capabilities in (NO_GPU, A100S):
        placement = choose_device_and_dtype("cpu" if capabilities.gpu_names else "auto", capabilities=capabilities)
        assert placement == (None, torch.float32, "CPU, float32")
        assert "device_map" not in load_kwargs(placement)
    with pytest.raises(UserInputError, match="device 'cuda'.*no CUDA GPU"):
        choose_device_and_dtype("cuda", capabilities=NO_GPU)
    with pytest.raises(UserInputError, match="device 'tpu'"):
        choose_device_and_dtype("tpu")
    with pytest.raises(UserInputError, match="precision 'fp8'"):
        choose_device_and_dtype("auto", "fp8")


def _tiny_llama(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_the_cpu_branch_loads_a_plain_float32_model_with_unchanged_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the test covers the CPU branch of 'auto'")
    assert detect_capabilities() == NO_GPU
    folder = _tiny_llama(tmp_path / "model")
    placement = choose_device_and_dtype()
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs(placement))
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype is torch.float32 and getattr(model, "hf_device_map", None) is None
    ids = torch.tensor([[1, 5, 7, 9]]).to(input_device(model))
    assert input_device(model) == torch.device("cpu")
    assert torch.equal(model(ids).logits, plain(ids).logits)  # bit for bit the numbers of a plain CPU load


def test_dtype_argument_raises_no_deprecation_warning(tmp_path):
    import transformers
    from transformers import AutoModelForCausalLM

    folder = _tiny_llama(tmp_path / "model")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **dtype_argument(torch.bfloat16))
    finally:
        library_logger.removeHandler(handler)
    assert model.dtype is torch.bfloat16
    assert not [message for message in records if "deprecated" in message], records
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    assert list(dtype_argument(torch.float32)) == (["dtype"] if (major, minor) >= (4, 56) else ["torch_dtype"])
