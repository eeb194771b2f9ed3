"""Read and rewrite safetensors files one tensor at a time, never loading a whole shard.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
byte range; an optional ``__metadata__`` map), then the raw tensor bytes. The ``safetensors`` library reads
tensors well, but it offers no way to learn a tensor's byte range from the header, nor to write a file from a
mix of tensors on disk and in memory: its writer needs every tensor in memory, and it reorders them. This
module does the two things the embeddings stage needs:

- :func:`read_safetensors_header` parses a header (and refuses truncated or foreign files);
  :func:`read_tensor` reads one tensor into a fresh torch tensor;
- :func:`rewrite_safetensors` writes a copy of a file with some tensors replaced or added: unchanged tensors
  are streamed byte for byte in their original order, each new tensor is made, written and freed in turn.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.errors import UserInputError

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header


class SafetensorsError(UserInputError):
    """A safetensors file is damaged, foreign or holds a dtype this stage does not handle."""


@dataclass
class TensorEntry:
    """One tensor's place in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class SafetensorsFile:
    """The parsed header of a safetensors file (no tensor data is read)."""

    path: Path
    data_start: int
    tensors: dict[str, TensorEntry]
    metadata: dict | None
    header_sha256: str


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse a safetensors header; a truncated or foreign file is a clear error."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(
                f"{path} is not a safetensors file (shorter than its 8-byte header length); "
                "download or save the checkpoint again."
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or length > MAX_HEADER_BYTES:
            raise SafetensorsError(
                f"{path} is not a valid safetensors file (header length {length} for a file of {size} "
                "bytes); download or save the checkpoint again."
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None)
        tensors = {
            name: TensorEntry(info["dtype"], tuple(info["shape"]), *info["data_offsets"])
            for name, info in header.items()
        }
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        raise SafetensorsError(
            f"{path} is not a valid safetensors file (unreadable header); download or save it again."
        ) from None
    data_start = 8 + length
    end = max((t.end for t in tensors.values()), default=0)
    if data_start + end > size:
        raise SafetensorsError(
            f"{path} is truncated: its header needs {data_start + end} bytes, the file has {size}; "
            "download it again."
        )
    return SafetensorsFile(path, data_start, tensors, metadata, hashlib.sha256(raw).hexdigest())


def torch_dtype_of(code: str, where: str = "") -> Any:
    """The torch dtype of a safetensors dtype code (``BF16``, ``F16``, ``F32``, ``F64``)."""
    import torch

    if code not in _DTYPES:
        raise SafetensorsError(
            f"{where or 'a tensor'} has dtype {code}, which this stage does not extend; save the checkpoint "
            "in bf16, fp16 or fp32 (for example with transformers' save_pretrained) and pass that folder."
        )
    return getattr(torch, _DTYPES[code])


def dtype_code(dtype: Any) -> str:
    """The safetensors dtype code of a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    return next(code for code, value in _DTYPES.items() if value == name)


def element_size(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    import torch

    return torch.empty((), dtype=torch_dtype_of(code)).element_size()


def _as_bytes(tensor: Any) -> memoryview:
    """The raw little-endian bytes of a contiguous tensor, without copying."""
    import torch

    tensor = tensor.contiguous()
    same_size_int = getattr(torch, _INT_OF_SIZE[tensor.element_size()])
    return memoryview(tensor.view(same_size_int).numpy()).cast("B")


def read_tensor(file: SafetensorsFile, name: str) -> Any:
    """Read one tensor from a safetensors file into a fresh torch tensor (no memory map)."""
    import torch

    entry = file.tensors[name]
    tensor = torch.empty(entry.shape, dtype=torch_dtype_of(entry.dtype, f"{file.path}: tensor {name}"))
    view = _as_bytes(tensor)
    if len(view) != entry.end - entry.begin:
        raise SafetensorsError(
            f"{file.path}: tensor {name} has {entry.end - entry.begin} bytes for shape "
            f"{entry.shape} {entry.dtype}; the file is damaged: download it again."
        )
    with open(file.path, "rb") as handle:
        handle.seek(file.data_start + entry.begin)
        if handle.readinto(view) != len(view):
            raise SafetensorsError(f"{file.path}: tensor {name} is truncated; download the file again.")
    return tensor


@dataclass
class NewTensor:
    """A tensor to write: its dtype and shape up front, its data made only when it is written."""

    dtype: str
    shape: tuple[int, ...]
    make: Callable[[], Any]


def rewrite_safetensors(
    source: SafetensorsFile, target: Path, replace: dict[str, NewTensor], chunk: int = 16 << 20
) -> int:
    """Write ``target``: ``source`` with the tensors in ``replace`` swapped or added; returns data bytes.

    Unchanged tensors are streamed byte for byte; each new tensor is made, written and freed in turn.
    """
    names = sorted(source.tensors, key=lambda n: source.tensors[n].begin)
    names += [n for n in replace if n not in source.tensors]
    header: dict[str, Any] = {}
    if source.metadata is not None:
        header["__metadata__"] = source.metadata
    offset = 0
    for name in names:
        if name in replace:
            new = replace[name]
            dtype, shape = new.dtype, new.shape
            nbytes = math.prod(shape) * element_size(dtype)
        else:
            entry = source.tensors[name]
            dtype, shape = entry.dtype, entry.shape
            nbytes = entry.end - entry.begin
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(target, "wb") as out, open(source.path, "rb") as src:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            if name in replace:
                _write_new(out, name, replace[name])
            else:
                _copy_range(src, out, source.data_start + source.tensors[name].begin, source.tensors[name], chunk)
    return offset


def _write_new(out: Any, name: str, new: NewTensor) -> None:
    tensor = new.make()
    if tuple(tensor.shape) != new.shape or dtype_code(tensor.dtype) != new.dtype:
        raise RuntimeError(
            f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, expected {new.shape} {new.dtype}"
        )
    out.write(_as_bytes(tensor))


def _copy_range(src: Any, out: Any, start: int, entry: TensorEntry, chunk: int) -> None:
    src.seek(start)
    remaining = entry.end - entry.begin
    while remaining:
        block = src.read(min(chunk, remaining))
        out.write(block)
        remaining -= len(block)
