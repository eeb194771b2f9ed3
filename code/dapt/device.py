"""Where a whole model runs and in which precision, for the stages that score or check one (evaluate, export).

The rule: CUDA when PyTorch sees a GPU, with the model spread over every visible GPU by accelerate's
``device_map="auto"`` (a model too large for one GPU is split across them), in bfloat16 when every visible GPU
computes in it (compute capability 8.0 or newer: A100, H100, L40 ...), else in float32; without a GPU, the CPU
in float32, exactly as before this module existed (a CPU placement loads the model as a plain, undispatched one).

    placement = choose_device_and_dtype("auto")
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs(placement))
    ids = ids.to(input_device(model))

:func:`dtype_argument` also hides transformers' rename of ``torch_dtype`` to ``dtype`` (4.56): the container's
4.40 knows only ``torch_dtype``, 4.57 warns that it is deprecated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from dapt.errors import UserInputError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16")
# Ampere (8.0) and newer GPUs compute in bfloat16 natively.
BF16_MIN_COMPUTE_CAPABILITY = 8


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers: the visible CUDA GPUs (names) and whether all of them compute in bfloat16."""

    gpu_names: tuple[str, ...] = ()
    bf16: bool = False


class Placement(NamedTuple):
    """Where a model goes: ``device_map`` for ``from_pretrained`` (None: the CPU), the dtype, and a description."""

    device_map: str | None
    dtype: Any  # a torch.dtype
    description: str


def detect_capabilities() -> Capabilities:
    """The CUDA GPUs PyTorch sees (``CUDA_VISIBLE_DEVICES`` applies) and whether all of them support bfloat16."""
    import torch

    if not torch.cuda.is_available():
        return Capabilities()
    count = torch.cuda.device_count()
    names = tuple(torch.cuda.get_device_name(i) for i in range(count))
    bf16 = all(torch.cuda.get_device_capability(i)[0] >= BF16_MIN_COMPUTE_CAPABILITY for i in range(count))
    return Capabilities(gpu_names=names, bf16=bf16)


def choose_device_and_dtype(prefer: str = "auto", precision: str = "auto",
                            capabilities: Capabilities | None = None) -> Placement:
    """Choose the device and dtype for running a whole model.

    ``prefer``: ``auto`` (CUDA when present, else the CPU), ``cpu`` or ``cuda`` (refused without a GPU).
    ``precision``: ``auto`` (bfloat16 on GPUs that support it, float32 elsewhere), ``float32`` or ``bfloat16``.
    ``capabilities`` defaults to :func:`detect_capabilities` (tests pass made-up ones).
    """
    import torch

    if prefer not in DEVICES:
        raise UserInputError(f"device {prefer!r} is not one of {', '.join(DEVICES)}.")
    if precision not in PRECISIONS:
        raise UserInputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}.")
    found = detect_capabilities() if capabilities is None else capabilities
    if prefer == "cuda" and not found.gpu_names:
        raise UserInputError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU on this machine "
                             "(torch.cuda.is_available() is False); use device 'auto' or 'cpu'.")
    if prefer == "cpu" or not found.gpu_names:
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        return Placement(None, dtype, f"CPU, {_name(dtype)}")
    if precision == "bfloat16" and not found.bf16:
        raise UserInputError(f"precision 'bfloat16' was asked for, but not every visible GPU supports it "
                             f"({', '.join(found.gpu_names)}; compute capability "
                             f"{BF16_MIN_COMPUTE_CAPABILITY}.0 or newer needed); use 'auto' or 'float32'.")
    dtype = torch.bfloat16 if precision == "bfloat16" or (precision == "auto" and found.bf16) else torch.float32
    gpus = f"{len(found.gpu_names)} x {found.gpu_names[0]}" if len(set(found.gpu_names)) == 1 else \
        ", ".join(found.gpu_names)
    return Placement("auto", dtype, f"CUDA ({gpus}; device_map=auto), {_name(dtype)}")


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_argument(dtype: Any) -> dict[str, Any]:
    """The dtype keyword for loading: ``dtype`` from transformers 4.56, else ``torch_dtype``."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_kwargs(placement: Placement) -> dict[str, Any]:
    """``from_pretrained`` keywords for ``placement``: its dtype, and ``device_map`` on GPUs."""
    kwargs = dtype_argument(placement.dtype)
    if placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
    return kwargs


def input_device(model: Any) -> Any:
    """The device a model's input ids go to (that of its input embeddings, also when it is split over GPUs)."""
    return model.get_input_embeddings().weight.device
