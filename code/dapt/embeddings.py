"""Extend a Llama checkpoint's embedding and output layers to the adapted tokenizer's vocabulary.

Checkpoint surgery on safetensors files, never loading the whole model:

- only ``model.embed_tokens.weight`` and ``lm_head.weight`` are read into memory, one at a time;
- the shard(s) holding them are rewritten: the other tensors' bytes are streamed unchanged from the old
  file into the new one, so their dtype and bits stay exactly as they were;
- shards without a changed tensor are hard-linked (copied where links are impossible);
- ``config.json`` gets the new ``vocab_size``; the ADAPTED tokenizer files replace the base ones.

Initialisation of the rows that are appended (ids ``base_vocab_size`` and above):

- domain tokens, input rows: ``mean`` (default) of the base input rows of the token's sub-tokens, or
  ``random`` (normal, mean 0, the standard deviation of all base rows' elements). Sub-tokens: the token's
  surface text (``▁`` read as a space) encoded by the BASE SentencePiece model with its dummy prefix and
  whitespace collapsing switched off. A token ``▁word`` is thus split exactly as the base tokenizer splits
  `` word`` in running text (``▁wo`` + ``rd``); no stray bare ``▁`` piece enters the average unless the
  base vocabulary itself has no piece joining that space to the next character.
- domain tokens, output rows: ``zero`` (default, as in the ChipNeMo paper: the new token's logit starts at
  0) or ``mean`` (mean of the sub-tokens' base output rows).
- reserved padding tokens: ``mean`` (default) of ALL base rows of the matrix, a token-neutral vector whose
  logit is the average base logit, or ``zero``.
- tied embeddings (one matrix for input and output): a zero output row would also be a zero input row, so
  ``--output-init zero`` is refused; use ``--output-init mean`` (the shared row follows ``--input-init``) or
  ``--untie-embeddings``, which writes a separate ``lm_head.weight`` (base rows copied) so the output rows
  can start at zero.

Original rows are copied bit for bit, so for inputs of original tokens the original tokens' logits do not
change.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dapt.artifacts import file_sha256, jsonable, require_stage, stage_output, write_json
from dapt.config import CODE_DIR, DEFAULT_OUTPUTS, param
from dapt.errors import UserInputError

STAGE = "embeddings"
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DOMAIN_TOKENS_FILES = ("domain_tokens.json", "added_tokens.json")  # the tokenizer stage's list of new tokens
ADAPTED_TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    *DOMAIN_TOKENS_FILES,
)
COPIED_EXTRA_FILES = ("generation_config.json",)
COPIED_LICENCE_PREFIXES = ("LICENSE", "LICENCE", "USE_POLICY", "NOTICE")


class EmbeddingsError(UserInputError):
    """The base checkpoint or the adapted tokenizer cannot be combined; the message says why."""


@dataclass
class EmbeddingsConfig:
    """Parameters of the ``embeddings`` stage."""

    base_model: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_model", "base HF Llama checkpoint folder")
    tokenizer: Path = param(
        DEFAULT_OUTPUTS / "tiny" / "tokenizer", "adapted tokenizer folder (tokenizer stage)"
    )
    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "extended_model", "output HF checkpoint folder")
    base_tokenizer: Path | None = param(
        None, "base SentencePiece model; None: BASE_MODEL/tokenizer.model"
    )
    input_init: Literal["mean", "random"] = param("mean", "new input rows: mean of sub-token rows, or random")
    output_init: Literal["zero", "mean"] = param("zero", "new output rows: zero (ChipNeMo paper) or mean")
    reserved_init: Literal["mean", "zero"] = param(
        "mean", "reserved padding rows: mean of all base rows, or zero"
    )
    untie_embeddings: bool = param(False, "write a separate lm_head.weight for a model with tied embeddings")
    vocab_multiple: int = param(
        128, "require the new vocabulary to be a multiple of this (128 x TP for NeMo)"
    )
    seed: int = param(0, "seed for --input-init random")
    link_shards: bool = param(True, "hard-link unchanged shards instead of copying them")
    heldout: Path = param(CODE_DIR / "heldout" / "domain", "held-out JSONL scored by the sanity check")
    sanity_check: bool = param(True, "load the extended model and score held-out text (small models only)")
    sanity_max_bytes: int = param(1 << 30, "skip the sanity check for checkpoints larger than this")
    sanity_documents: int = param(8, "held-out documents scored by the sanity check")


# --- safetensors files --------------------------------------------------------------------------

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


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
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise EmbeddingsError(
                f"{path} is not a safetensors file (shorter than its 8-byte header length)."
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or length > 100_000_000:
            raise EmbeddingsError(f"{path} is not a valid safetensors file (header length {length}).")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EmbeddingsError(f"{path} is not a valid safetensors file (unreadable header).") from None
    metadata = header.pop("__metadata__", None)
    tensors = {
        name: TensorEntry(info["dtype"], tuple(info["shape"]), *info["data_offsets"])
        for name, info in header.items()
    }
    data_start = 8 + length
    end = max((t.end for t in tensors.values()), default=0)
    if data_start + end > size:
        raise EmbeddingsError(
            f"{path} is truncated: its header needs {data_start + end} bytes, the file has {size}; "
            "download it again."
        )
    return SafetensorsFile(path, data_start, tensors, metadata, hashlib.sha256(raw).hexdigest())


def _torch_dtype(code: str) -> Any:
    import torch

    if code not in _DTYPES:
        raise EmbeddingsError(f"embedding dtype {code} is not supported (use BF16, F16, F32 or F64).")
    return getattr(torch, _DTYPES[code])


def _dtype_code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, value in _DTYPES.items() if value == name)


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
    tensor = torch.empty(entry.shape, dtype=_torch_dtype(entry.dtype))
    view = _as_bytes(tensor)
    if len(view) != entry.end - entry.begin:
        raise EmbeddingsError(
            f"{file.path}: tensor {name} has {entry.end - entry.begin} bytes for shape "
            f"{entry.shape} {entry.dtype}; the file is damaged."
        )
    with open(file.path, "rb") as handle:
        handle.seek(file.data_start + entry.begin)
        if handle.readinto(view) != len(view):
            raise EmbeddingsError(f"{file.path}: tensor {name} is truncated.")
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
            nbytes = math.prod(new.shape) * _element_size(new.dtype)
            header[name] = {
                "dtype": new.dtype,
                "shape": list(new.shape),
                "data_offsets": [offset, offset + nbytes],
            }
        else:
            entry = source.tensors[name]
            nbytes = entry.end - entry.begin
            header[name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + nbytes],
            }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(target, "wb") as out, open(source.path, "rb") as src:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            if name in replace:
                tensor = replace[name].make()
                if (
                    tuple(tensor.shape) != replace[name].shape
                    or _dtype_code(tensor.dtype) != replace[name].dtype
                ):
                    raise RuntimeError(
                        f"{name}: made {tuple(tensor.shape)} {tensor.dtype}, expected "
                        f"{replace[name].shape} {replace[name].dtype}"
                    )
                out.write(_as_bytes(tensor))
                del tensor
            else:
                entry = source.tensors[name]
                src.seek(source.data_start + entry.begin)
                remaining = entry.end - entry.begin
                while remaining:
                    block = src.read(min(chunk, remaining))
                    out.write(block)
                    remaining -= len(block)
    return offset


def _element_size(code: str) -> int:
    import torch

    return torch.empty((), dtype=_torch_dtype(code)).element_size()


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """An HF Llama checkpoint folder: its config and where each tensor lives."""

    folder: Path
    config: dict
    files: dict[str, SafetensorsFile]  # file name -> parsed header
    weight_map: dict[str, str]  # tensor name -> file name
    index: dict | None

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) or LM_HEAD not in self.weight_map


def open_checkpoint(folder: Path) -> Checkpoint:
    """Read ``config.json`` and the safetensors headers (single file or sharded with an index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbeddingsError(
            f"base model folder {folder} does not exist; pass --base-model (an HF Llama folder)."
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise EmbeddingsError(
            f"base model folder {folder} has no config.json; pass an HF Llama checkpoint folder."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise EmbeddingsError(f"{config_path}: model_type is {config.get('model_type')!r}, not 'llama'.")
    index = None
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        weight_map = dict(index.get("weight_map") or {})
        if not weight_map:
            raise EmbeddingsError(f"{folder / INDEX} has an empty weight_map.")
    elif (folder / SINGLE).is_file():
        weight_map = {}
    else:
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.safetensors")
        )
        raise EmbeddingsError(
            f"base model folder {folder} has neither {SINGLE} nor {INDEX} (found: {found or 'no weights'}); "
            "only safetensors checkpoints are supported: convert .bin weights with save_pretrained first."
        )
    files: dict[str, SafetensorsFile] = {}
    for name in sorted(set(weight_map.values())) or [SINGLE]:
        path = folder / name
        if not path.is_file():
            raise EmbeddingsError(f"shard {path} listed in {folder / INDEX} is missing; download it again.")
        files[name] = read_safetensors_header(path)
    if index is None:
        weight_map = dict.fromkeys(files[SINGLE].tensors, SINGLE)
    for tensor, name in weight_map.items():
        if tensor not in files[name].tensors:
            raise EmbeddingsError(f"{folder / INDEX} maps {tensor} to {name}, which does not hold it.")
    if EMBED not in weight_map:
        raise EmbeddingsError(f"base model {folder} has no {EMBED}; is it a Llama checkpoint?")
    return Checkpoint(folder, config, files, weight_map, index)


def _entry(checkpoint: Checkpoint, tensor: str) -> TensorEntry:
    return checkpoint.files[checkpoint.weight_map[tensor]].tensors[tensor]


def _load_sentencepiece_proto(path: Path, what: str) -> Any:
    from dapt.compat import sentencepiece_model_pb2

    if not Path(path).is_file():
        raise EmbeddingsError(f"{what} {path} does not exist.")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise EmbeddingsError(f"{what} {path} is not a SentencePiece model.") from None
    if not proto.pieces:
        raise EmbeddingsError(f"{what} {path} is not a SentencePiece model (no pieces).")
    return proto


@dataclass
class NewToken:
    """One appended vocabulary entry."""

    id: int
    token: str
    kind: str  # "domain" or "reserved"


def check_compatibility(
    checkpoint: Checkpoint,
    base_proto: Any,
    adapted_proto: Any,
    added: dict,
    paths: dict[str, Path],
    vocab_multiple: int,
) -> list[NewToken]:
    """Refuse a checkpoint/tokenizer pair that does not fit; return the appended tokens in id order."""
    base_size, new_size = len(base_proto.pieces), len(adapted_proto.pieces)
    rows = _entry(checkpoint, EMBED).shape[0]
    config_vocab = checkpoint.config.get("vocab_size")
    if rows != base_size or config_vocab != base_size:
        raise EmbeddingsError(
            f"vocabulary mismatch: {paths['base_model']} has vocab_size {config_vocab} and {rows} embedding "
            "rows, "
            f"its base tokenizer {paths['base_tokenizer']} has {base_size} pieces; pass the tokenizer this "
            "checkpoint was trained with (--base-tokenizer) or an unpadded checkpoint."
        )
    if not checkpoint.tied and _entry(checkpoint, LM_HEAD).shape != _entry(checkpoint, EMBED).shape:
        raise EmbeddingsError(f"{paths['base_model']}: {LM_HEAD} and {EMBED} have different shapes.")
    if new_size <= base_size:
        raise EmbeddingsError(
            f"adapted tokenizer {paths['adapted']} has {new_size} pieces, no more than the base's "
            f"{base_size}: "
            "it adds no tokens (or belongs to another model)."
        )
    for i in range(base_size):
        old, new = base_proto.pieces[i], adapted_proto.pieces[i]
        if old.piece != new.piece or old.type != new.type:
            raise EmbeddingsError(
                f"adapted tokenizer {paths['adapted']} is not an extension of the model's tokenizer "
                f"{paths['base_tokenizer']}: id {i} is {new.piece!r} there but {old.piece!r} in the base. "
                "Build the adapted tokenizer from this model's tokenizer.model."
            )
    if added.get("base_vocab_size") != base_size or added.get("vocab_size") != new_size:
        raise EmbeddingsError(
            f"{paths['added']}: base_vocab_size {added.get('base_vocab_size')} / vocab_size "
            f"{added.get('vocab_size')} do not match the base ({base_size}) and adapted ({new_size}) "
            "tokenizers."
        )
    if vocab_multiple > 0 and new_size % vocab_multiple:
        raise EmbeddingsError(
            f"adapted vocabulary {new_size} is not a multiple of --vocab-multiple {vocab_multiple}; "
            "NeMo would "
            "add padding rows of its own. Pad the tokenizer (tokenizer stage) or pass --vocab-multiple 0."
        )
    tokens = sorted(
        (
            NewToken(int(t["id"]), str(t["token"]), str(t.get("kind", "domain")))
            for t in added.get("tokens", [])
        ),
        key=lambda t: t.id,
    )
    if [t.id for t in tokens] != list(range(base_size, new_size)):
        raise EmbeddingsError(
            f"{paths['added']}: tokens must list every id from {base_size} to {new_size - 1}."
        )
    for token in tokens:
        if adapted_proto.pieces[token.id].piece != token.token or token.kind not in ("domain", "reserved"):
            raise EmbeddingsError(
                f"{paths['added']}: entry {token} does not match piece "
                f"{adapted_proto.pieces[token.id].piece!r} of the adapted tokenizer."
            )
    return tokens


# --- initialisation -----------------------------------------------------------------------------


def subtoken_encoder(base_proto: Any) -> Any:
    """The base SentencePiece model with dummy prefix and whitespace collapsing off, for surface texts."""
    import sentencepiece as spm

    from dapt.compat import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.CopyFrom(base_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def subtoken_ids(encoder: Any, token: str) -> list[int]:
    """Base ids of a new token's surface text (``▁`` read as a space)."""
    return list(encoder.encode(token.replace("\u2581", " ")))


@dataclass
class InitPlan:
    """How the appended rows of one matrix are filled."""

    domain: Literal["mean", "random", "zero"]
    reserved: Literal["mean", "zero"]


def _row_blocks(matrix: Any, dtype: Any, rows: int = 1024) -> Any:
    """Yield ``(start, block)``: consecutive row blocks copied into ONE reused buffer of ``dtype``.

    Reusing the buffer keeps memory flat: fresh block-sized copies fragment the C heap, and the process
    then holds hundreds of MB it no longer uses.
    """
    buffer = None
    for start in range(0, matrix.shape[0], rows):
        part = matrix[start : start + rows]
        if buffer is None or buffer.shape[0] != part.shape[0]:
            buffer = part.to(dtype, copy=True)  # never a view: the buffer is overwritten below
        else:
            buffer.copy_(part)
        yield start, buffer


def column_mean_and_std(matrix: Any) -> tuple[Any, float]:
    """The mean row and the standard deviation of all elements, by float32 row blocks (float64 totals)."""
    import torch

    total = torch.zeros(matrix.shape[1], dtype=torch.float64)
    squares = 0.0
    for _, block in _row_blocks(matrix, torch.float32):
        total += block.sum(dim=0, dtype=torch.float64)
        flat = block.view(-1)
        squares += float(torch.dot(flat, flat))
    count = matrix.shape[0] * matrix.shape[1]
    mean_all = float(total.sum()) / count
    std = math.sqrt(max(squares / count - mean_all**2, 0.0))
    return (total / matrix.shape[0]).float(), std


def extended_matrix(
    base: Any, tokens: list[NewToken], subtokens: dict[int, list[int]], plan: InitPlan, seed: int
) -> Any:
    """The base matrix with one row appended per new token; base rows are copied bit for bit."""
    import torch

    base_rows, dim = base.shape
    out = torch.empty((base_rows + len(tokens), dim), dtype=base.dtype)
    out[:base_rows] = base
    mean_row, std = column_mean_and_std(base)
    domain = [t.id for t in tokens if t.kind == "domain"]
    reserved = [t.id for t in tokens if t.kind == "reserved"]
    if reserved:
        fill = mean_row if plan.reserved == "mean" else torch.zeros(dim)
        out[reserved] = fill.to(base.dtype).expand(len(reserved), dim)
    if plan.domain == "zero":
        out[domain] = 0
    elif plan.domain == "random":
        generator = torch.Generator().manual_seed(seed)
        out[domain] = (torch.randn(len(domain), dim, generator=generator) * std).to(base.dtype)
    else:
        for start in range(0, len(domain), 256):  # vectorised means, a block of new tokens at a time
            block = domain[start : start + 256]
            flat = torch.tensor([i for t in block for i in subtokens[t]])
            owner = torch.tensor([k for k, t in enumerate(block) for _ in subtokens[t]])
            sums = torch.zeros(len(block), dim).index_add_(0, owner, base[flat].float())
            counts = torch.tensor([float(len(subtokens[t])) for t in block])
            out[block] = (sums / counts[:, None]).to(base.dtype)
    return out


def row_norms(matrix: Any, tokens: list[NewToken]) -> dict[str, np.ndarray]:
    """L2 norms of base, domain and reserved rows."""
    import torch

    norms = np.empty(matrix.shape[0], dtype=np.float32)
    for start, block in _row_blocks(matrix, torch.float32):
        norms[start : start + block.shape[0]] = block.norm(dim=1).numpy()
    base_rows = matrix.shape[0] - len(tokens)
    domain = [t.id for t in tokens if t.kind == "domain"]
    reserved = [t.id for t in tokens if t.kind == "reserved"]
    return {"base": norms[:base_rows], "domain": norms[domain], "reserved": norms[reserved]}


def plot_row_norms(norms: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Histograms of row norms, new against old, one panel per written matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4), squeeze=False)
    for ax, (matrix, groups) in zip(axes[0], norms.items(), strict=True):
        values = np.concatenate([v for v in groups.values() if len(v)])
        bins = np.linspace(float(values.min()), float(values.max()) + 1e-6, 50)
        for label, color in (("base", "tab:gray"), ("domain", "tab:blue"), ("reserved", "tab:orange")):
            if len(groups[label]):
                ax.hist(
                    groups[label],
                    bins=bins,
                    alpha=0.6,
                    color=color,
                    density=True,
                    label=f"{label} rows ({len(groups[label])})",
                )
        ax.set_title(f"{matrix}: L2 norm of rows")
        ax.set_xlabel("row norm")
        ax.set_ylabel("density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- sanity check -------------------------------------------------------------------------------


def sanity_check(
    base_folder: Path, extended_folder: Path, base_sp: Any, adapted_sp: Any, texts: list[str]
) -> dict:
    """Load the extended model, score held-out text, and compare original-token logits with the base model."""
    import torch
    from transformers import LlamaForCausalLM

    from dapt.evaluate import bits_per_byte

    extended = LlamaForCausalLM.from_pretrained(str(extended_folder)).float().eval()
    base = LlamaForCausalLM.from_pretrained(str(base_folder)).float().eval()
    base_vocab = base.config.vocab_size
    probe = ([base_sp.bos_id()] + list(base_sp.encode(texts[0] if texts else "hello world")))[:128]
    with torch.no_grad():
        old = base(input_ids=torch.tensor([probe])).logits[0]
        new = extended(input_ids=torch.tensor([probe])).logits[0]
    new_mass = torch.softmax(new, dim=-1)[:, base_vocab:].sum(dim=-1).mean()
    result = {
        "loads": True,
        "original_logits_max_abs_diff": float((new[:, :base_vocab] - old).abs().max()),
        "new_token_probability_mass_on_base_text": round(float(new_mass), 6),
        "heldout_documents": len(texts),
    }
    if texts:
        result["heldout_bits_per_byte_base"] = round(bits_per_byte(base, base_sp, texts), 4)
        result["heldout_bits_per_byte_extended"] = round(bits_per_byte(extended, adapted_sp, texts), 4)
        tokens_base = sum(len(base_sp.encode(t)) for t in texts)
        tokens_new = sum(len(adapted_sp.encode(t)) for t in texts)
        result["heldout_tokens_base"], result["heldout_tokens_extended"] = tokens_base, tokens_new
    return result


def _heldout_texts(folder: Path, limit: int) -> list[str]:
    from dapt.corpus import iter_documents

    texts = []
    for doc in iter_documents(folder):
        texts.append(doc.text)
        if len(texts) >= limit:
            break
    return texts


# --- the stage ----------------------------------------------------------------------------------


def _init_plans(config: EmbeddingsConfig, tied: bool, paths: dict) -> tuple[InitPlan, InitPlan | None]:
    """Plans for the input matrix and a separate output matrix (None: output and input share one)."""
    input_plan = InitPlan(config.input_init, config.reserved_init)
    if tied and not config.untie_embeddings:
        if config.output_init == "zero":
            raise EmbeddingsError(
                f"base model {paths['base_model']} ties its input and output embeddings (one matrix): "
                "a new row cannot be a mean input row and a zero output row at once. "
                "Pass --output-init mean (the shared "
                "row follows --input-init) or --untie-embeddings (separate lm_head.weight, zero new rows)."
            )
        return input_plan, None
    return input_plan, InitPlan("zero" if config.output_init == "zero" else "mean", config.reserved_init)


def _fingerprints(checkpoint: Checkpoint, paths: dict) -> dict:
    return {
        "base_model": {
            "path": str(checkpoint.folder),
            "config_sha256": file_sha256(checkpoint.folder / "config.json"),
            # shards: size and header hash (hashing 13+ GB of weights would dominate the run)
            "shards": {
                name: {"bytes": f.path.stat().st_size, "header_sha256": f.header_sha256}
                for name, f in checkpoint.files.items()
            },
        },
        "base_tokenizer": {
            "path": str(paths["base_tokenizer"]),
            "sha256": file_sha256(paths["base_tokenizer"]),
        },
        "tokenizer": {
            "path": str(paths["adapted_folder"]),
            "sha256": file_sha256(paths["adapted"]),
            "domain_tokens_sha256": file_sha256(paths["added"]),
        },
    }


def _link_or_copy(source: Path, target: Path, link: bool) -> str:
    if link:
        try:
            os.link(source, target)
            return "linked"
        except OSError:
            pass
    shutil.copy2(source, target)
    return "copied"


def _check_output(config: EmbeddingsConfig) -> None:
    out, base, tok = (Path(p).resolve() for p in (config.output, config.base_model, config.tokenizer))
    for other, what in ((base, "--base-model"), (tok, "--tokenizer")):
        if out == other or other in out.parents or out in other.parents:
            raise EmbeddingsError(
                f"--output {config.output} overlaps {what} {other}; choose a separate folder."
            )


def extend_embeddings(config: EmbeddingsConfig) -> Path:
    """Stage entry: the base checkpoint with embeddings resized and initialised for the adapted tokenizer."""
    import sentencepiece as spm

    start = time.perf_counter()
    _check_output(config)
    checkpoint = open_checkpoint(config.base_model)
    adapted_folder = Path(config.tokenizer)
    require_stage(adapted_folder, "tokenizer", "adapted tokenizer")
    paths = {
        "base_model": checkpoint.folder,
        "base_tokenizer": Path(config.base_tokenizer or checkpoint.folder / "tokenizer.model"),
        "adapted_folder": adapted_folder,
        "adapted": adapted_folder / "tokenizer.model",
        "added": next(
            (adapted_folder / n for n in DOMAIN_TOKENS_FILES if (adapted_folder / n).is_file()),
            adapted_folder / DOMAIN_TOKENS_FILES[0],
        ),
    }
    if not paths["base_tokenizer"].is_file():
        raise EmbeddingsError(
            f"base tokenizer {paths['base_tokenizer']} does not exist; the base model folder "
            "should hold tokenizer.model, or pass --base-tokenizer."
        )
    if not paths["added"].is_file():
        raise EmbeddingsError(
            f"{paths['added']} is missing; point --tokenizer to the tokenizer stage's output."
        )
    base_proto = _load_sentencepiece_proto(paths["base_tokenizer"], "base tokenizer")
    adapted_proto = _load_sentencepiece_proto(paths["adapted"], "adapted tokenizer")
    added = json.loads(paths["added"].read_text(encoding="utf-8"))
    tokens = check_compatibility(checkpoint, base_proto, adapted_proto, added, paths, config.vocab_multiple)
    input_plan, output_plan = _init_plans(config, checkpoint.tied, paths)

    encoder = subtoken_encoder(base_proto)
    subtokens = {t.id: subtoken_ids(encoder, t.token) for t in tokens if t.kind == "domain"}
    empty = [t.token for t in tokens if t.kind == "domain" and not subtokens[t.id]]
    if empty:
        raise EmbeddingsError(f"{paths['added']}: tokens with an empty surface text: {empty[:5]}")
    new_vocab = len(adapted_proto.pieces)
    norms: dict[str, dict[str, np.ndarray]] = {}

    def producer(source_tensor: str, plan: InitPlan, label: str) -> Callable[[], Any]:
        def make() -> Any:
            base = read_tensor(checkpoint.files[checkpoint.weight_map[source_tensor]], source_tensor)
            matrix = extended_matrix(base, tokens, subtokens, plan, config.seed + len(norms))
            norms[label] = row_norms(matrix, tokens)
            return matrix

        return make

    embed = _entry(checkpoint, EMBED)
    shape = (new_vocab, embed.shape[1])
    replacements: dict[str, dict[str, NewTensor]] = {}
    replacements.setdefault(checkpoint.weight_map[EMBED], {})[EMBED] = NewTensor(
        embed.dtype,
        shape,
        producer(EMBED, input_plan, "input embeddings" if output_plan else "tied embeddings"),
    )
    if output_plan is not None:
        head_source = EMBED if checkpoint.tied else LM_HEAD
        head_file = checkpoint.weight_map[head_source]
        replacements.setdefault(head_file, {})[LM_HEAD] = NewTensor(
            _entry(checkpoint, head_source).dtype, shape, producer(head_source, output_plan, "output layer")
        )

    parameters = jsonable(config)
    inputs = _fingerprints(checkpoint, paths)
    report: dict[str, Any] = {
        "base_vocab_size": len(base_proto.pieces),
        "vocab_size": new_vocab,
        "domain_tokens": sum(t.kind == "domain" for t in tokens),
        "reserved_tokens": sum(t.kind == "reserved" for t in tokens),
        "tied_embeddings_in_base": checkpoint.tied,
        "tied_embeddings_in_output": output_plan is None,
        "input_init": config.input_init,
        "output_init": config.output_init if output_plan else "tied",
        "reserved_init": config.reserved_init,
        "subtokens_per_domain_token": round(float(np.mean([len(v) for v in subtokens.values()] or [0])), 3),
        "shards": {},
    }
    with stage_output(config.output, STAGE, parameters, inputs) as folder:
        total_size = 0
        for name, file in checkpoint.files.items():
            if name in replacements:
                total_size += rewrite_safetensors(file, folder / name, replacements[name])
                report["shards"][name] = "rewritten"
            else:
                total_size += sum(t.end - t.begin for t in file.tensors.values())
                report["shards"][name] = _link_or_copy(file.path, folder / name, config.link_shards)
        _write_config(checkpoint, folder, new_vocab, untied=output_plan is not None and checkpoint.tied)
        if checkpoint.index is not None:
            index = json.loads(json.dumps(checkpoint.index))
            index.setdefault("metadata", {})["total_size"] = total_size
            if output_plan is not None:
                index["weight_map"][LM_HEAD] = checkpoint.weight_map[EMBED if checkpoint.tied else LM_HEAD]
            write_json(folder / INDEX, index)
        _copy_side_files(checkpoint.folder, adapted_folder, folder)
        plot_row_norms(norms, folder / "embedding_norms.png")
        report["row_norms"] = {
            matrix: {group: _summary(values) for group, values in groups.items()}
            for matrix, groups in norms.items()
        }
        report["surgery_seconds"] = round(time.perf_counter() - start, 2)
        if config.sanity_check and total_size <= config.sanity_max_bytes:
            texts = (
                _heldout_texts(config.heldout, config.sanity_documents)
                if Path(config.heldout).exists()
                else []
            )
            report["sanity_check"] = sanity_check(
                checkpoint.folder,
                folder,
                spm.SentencePieceProcessor(model_file=str(paths["base_tokenizer"])),
                spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")),
                texts,
            )
        else:
            report["sanity_check"] = "skipped" + ("" if config.sanity_check else " (--no-sanity-check)")
        write_json(folder / "report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("row_norms",)}, indent=1))
    return Path(config.output)


def _summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"rows": 0}
    return {
        "rows": int(len(values)),
        "mean": round(float(values.mean()), 5),
        "min": round(float(values.min()), 5),
        "max": round(float(values.max()), 5),
    }


def _write_config(checkpoint: Checkpoint, folder: Path, vocab_size: int, untied: bool) -> None:
    config = dict(checkpoint.config)
    config["vocab_size"] = vocab_size
    if untied:
        config["tie_word_embeddings"] = False
    write_json(folder / "config.json", config)


def _copy_side_files(base_folder: Path, adapted_folder: Path, folder: Path) -> None:
    """Generation config and licence files from the base; tokenizer files from the ADAPTED folder only."""
    for path in sorted(base_folder.iterdir()):
        if path.is_file() and (
            path.name in COPIED_EXTRA_FILES or path.name.upper().startswith(COPIED_LICENCE_PREFIXES)
        ):
            shutil.copy2(path, folder / path.name)
    for name in ADAPTED_TOKENIZER_FILES:
        if (adapted_folder / name).is_file():
            shutil.copy2(adapted_folder / name, folder / name)
