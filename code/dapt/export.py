"""Stage ``export``: the adapted model as a Hugging Face folder for NIM, and its verification.

The trained weights (an HF folder from the CPU engine, or a NeMo ``.nemo`` checkpoint inside the NeMo
container) become an HF folder that NIM's fine-tuned-model flow can serve: safetensors weights, ``config.json``
whose ``vocab_size`` equals the weights' rows, the ADAPTED tokenizer files with a Llama-2-style chat template,
and ``verify.json``, the result of :func:`verify_export`.

The tokenizer passed with ``--tokenizer`` must be the one the weights were trained with: the source's own
record of it (the ``.nemo``'s packed tokenizer, the HF folder's ``tokenizer.model``, or the SHA-256 that the
``train``/``embeddings`` stage wrote into the source's manifest) must be byte-identical, so a foreign tokenizer
of the same size is refused. The verification runs where :mod:`dapt.device` says (GPUs in bf16 where present,
else the CPU in float32) and states the logit tolerance it used in ``verify.json``.

The smoke test of a served export lives in :mod:`dapt.smoke_test`.

Why one module (about 750 lines): each verification check mirrors one step of the export (files, vocabulary
rows, tokenizer identity, chat template, logits), and a reader checks the pair side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from dapt.artifacts import file_sha256, read_manifest, stage_output, write_json
from dapt.config import DEFAULT_OUTPUTS, get_profile, param
from dapt.corpus import DEFAULT_HELDOUT, find_jsonl_files, iter_documents
from dapt.device import Placement, choose_device_and_dtype, dtype_argument, input_device, load_kwargs
from dapt.errors import UserInputError
from dapt.smoke_test import DEFAULT_PROMPT

# The files an adapted tokenizer folder must hold; all of them are copied into the export.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The tokenizer stage's own record of added tokens. HF's slow tokenizers read a file named
# ``added_tokens.json`` as a token -> id map, so the export keeps it under another name.
ADDED_TOKENS_RECORD = ("added_tokens.json", "dapt_added_tokens.json")

# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by (128) x tensor parallel size.
MEGATRON_VOCAB_MULTIPLE = 128

# The NeMo 1 converter shipped in the NeMo Framework 24.07 container (NeMo r2.0.0rc1) under /opt/NeMo.
NEMO_CONVERTER = Path("scripts/checkpoint_converters/convert_llama_nemo_to_hf.py")
NEMO_PRECISION = {"float32": "32", "bfloat16": "bf16", "float16": "16"}

# A Llama-2-style chat template, written for this project: an optional system message goes inside the
# first [INST] block between <<SYS>> markers; each user turn opens with BOS and is wrapped in
# [INST] ... [/INST]; each assistant turn follows its user turn and ends with EOS. The prompt ends after
# the last [/INST], where the model starts answering (so add_generation_prompt needs no extra text).
# The space after BOS gives "▁[" as Meta's Llama 2 chat format does (BOS, then "[INST] ..." encoded with
# SentencePiece's dummy prefix); the fast tokenizer adds no prefix after a special token by itself.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = messages[0]['content'] | trim -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system_text = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + ' [INST] ' }}"
    "{%- if loop.first and system_text -%}{{ '<<SYS>>\n' + system_text + '\n<</SYS>>\n\n' }}{%- endif -%}"
    "{{ (message['content'] | trim) + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + (message['content'] | trim) + ' ' + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('this chat template knows the roles system (first), user and assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# A NeMo 1 checkpoint (.nemo: a tar of ./model_config.yaml, the weights and the artifacts; or its extracted
# folder). NeMo packs the tokenizer model as "<32 hex digits>_<its file name>" and records it in
# model_config.yaml as tokenizer.model = "nemo:<that name>" (SaveRestoreConnector._handle_artifacts, NeMo r2.0.0rc1).
NEMO_CONFIG = "model_config.yaml"
NEMO_ARTIFACT_PREFIX = "nemo:"
MAX_NEMO_CONFIG_BYTES = 8 * 2**20

# Stages of this project whose manifest records the tokenizer of the model folder they wrote:
# stage -> keys under "inputs" leading to its SHA-256.
MANIFEST_TOKENIZER_RECORDS = {"train": ("model", "tokenizer_sha256"), "embeddings": ("tokenizer", "sha256")}

# Logit tolerance of the verification for computation in bf16/fp16: this many units in the last place
# (torch.finfo(dtype).eps) of the largest reference logit. float32 uses --logits-tolerance.
REDUCED_PRECISION_ULPS = 4


class ExportError(UserInputError):
    """The export's inputs do not fit together, or the exported folder failed verification."""


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


@dataclass
class ExportConfig:
    """Inputs and checks of the export stage."""

    profile: str = param("tiny", "profile whose output folders are the defaults")
    source: Path | None = param(
        None, "trained model: an HF folder (CPU engine) or a .nemo file / extracted folder (NeMo container); "
        "default outputs/<profile>/dapt_model")
    tokenizer: Path | None = param(None, "adapted tokenizer folder; default outputs/<profile>/tokenizer")
    output: Path | None = param(None, "export folder; default outputs/<profile>/export")
    base_hf_model: Path | None = param(
        None, "for a .nemo source: the base model's HF folder (its config.json gives the architecture)")
    nemo_root: Path = param(Path("/opt/NeMo"), "NeMo source tree holding scripts/checkpoint_converters")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = param(
        "auto", "dtype of the exported weights; auto keeps the source's")
    max_tensor_parallel: int | None = param(
        None, "largest TP size the training may have padded the vocabulary for (at least 1); "
        "default: the profile's")
    allow_unverified_tokenizer: bool = param(
        False, "export even when the source records no tokenizer to compare --tokenizer with (an HF folder "
        "without tokenizer.model or manifest); a recorded tokenizer that differs is always refused")
    device: Literal["auto", "cpu", "cuda"] = param(
        "auto", "where the verification runs: auto = every visible CUDA GPU (bf16 where supported), else the "
        "CPU (float32)")
    heldout: Path = param(DEFAULT_HELDOUT, "held-out JSONL (file or folder) for the tokenizer check")
    heldout_docs: int = param(64, "held-out documents compared between the HF and SentencePiece tokenizers")
    heldout_chars: int = param(4000, "characters of each held-out document compared")
    logits_tolerance: float = param(
        1e-4, "largest absolute logit difference between source and export when computed in float32 (in "
        f"bf16/fp16: {REDUCED_PRECISION_ULPS} units in the last place of the largest logit)")
    probe_tokens: int = param(64, "tokens of held-out text used for the logit comparison")
    generate_tokens: int = param(16, "tokens generated greedily to check that generation runs")
    repetition_penalty: float = param(
        1.5, "repetition penalty of that greedy generation (1: none; 1.5 keeps the tiny model from repeating a "
        "newline, as the smoke test's frequency_penalty 0.5 does on transformers serve)")
    prompt: str = param(DEFAULT_PROMPT, "prompt for the generation check (the start of a SystemVerilog module)")


@dataclass
class TokenizerInfo:
    """What the export needs to know about the adapted tokenizer folder."""

    folder: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    sha256: str


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(config: ExportConfig) -> None:
    """Refuse numbers that cannot work, naming the user's own value."""
    for flag, value in (("--max-tensor-parallel", config.max_tensor_parallel),
                        ("--heldout-docs", config.heldout_docs), ("--heldout-chars", config.heldout_chars),
                        ("--probe-tokens", config.probe_tokens), ("--generate-tokens", config.generate_tokens)):
        if value is not None and not _positive_int(value):
            raise ExportError(f"{flag} {value!r}: give a whole number of at least 1.")
    tolerance = config.logits_tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise ExportError(f"--logits-tolerance {tolerance!r}: give a finite number of at least 0.")
    penalty = config.repetition_penalty
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) \
            or penalty <= 0:
        raise ExportError(f"--repetition-penalty {penalty!r}: give a number above 0 (1: no penalty).")
    if not config.prompt:
        raise ExportError("--prompt is empty; the generation check needs text to continue.")


def _resolve(config: ExportConfig) -> tuple[Path, Path, Path, int]:
    try:
        profile = get_profile(config.profile)
    except ValueError as error:
        raise ExportError(f"--profile {config.profile}: {error}") from None
    root = DEFAULT_OUTPUTS / profile.name
    source = Path(config.source) if config.source else root / "dapt_model"
    tokenizer = Path(config.tokenizer) if config.tokenizer else root / "tokenizer"
    output = Path(config.output) if config.output else root / "export"
    max_tp = profile.max_tensor_parallel if config.max_tensor_parallel is None else config.max_tensor_parallel
    return source, tokenizer, output, max_tp


def load_tokenizer_info(folder: Path) -> TokenizerInfo:
    """Check that ``folder`` is a complete tokenizer folder and read its SentencePiece model."""
    import sentencepiece as spm

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(
            f"--tokenizer {folder} does not exist; pass the adapted tokenizer folder "
            "(the output of `python -m dapt tokenizer`)."
        )
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(
            f"tokenizer folder {folder} lacks {', '.join(missing)}; the export needs "
            f"{', '.join(TOKENIZER_FILES)} (rerun `python -m dapt tokenizer`)."
        )
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError) as error:
        raise ExportError(f"{folder / 'tokenizer.model'} is not a SentencePiece model: {error}") from None
    info = TokenizerInfo(folder=folder, vocab_size=processor.GetPieceSize(), bos_id=processor.bos_id(),
                         eos_id=processor.eos_id(), sha256=file_sha256(folder / "tokenizer.model"))
    record = folder / ADDED_TOKENS_RECORD[0]
    if record.is_file():
        declared = json.loads(record.read_text(encoding="utf-8")).get("vocab_size")
        if declared is not None and declared != info.vocab_size:
            raise ExportError(
                f"{record} declares vocab_size {declared} but {folder / 'tokenizer.model'} has "
                f"{info.vocab_size} pieces; the folder mixes files of two tokenizer runs."
            )
    return info


def padded_vocab_sizes(vocab_size: int, max_tensor_parallel: int) -> list[int]:
    """Row counts Megatron may give ``vocab_size`` tokens: padded to 128 x TP for TP = 1, 2, 4, ..."""
    sizes = []
    tp = 1
    while tp <= max_tensor_parallel:
        multiple = MEGATRON_VOCAB_MULTIPLE * tp
        sizes.append(math.ceil(vocab_size / multiple) * multiple)
        tp *= 2
    return sorted(set(sizes))


def check_vocab_rows(rows: int, vocab_size: int, max_tensor_parallel: int, where: str) -> int:
    """Return the number of padding rows to strip, or fail when the tokenizer cannot belong to the weights."""
    if rows == vocab_size:
        return 0
    allowed = padded_vocab_sizes(vocab_size, max_tensor_parallel)
    if rows < vocab_size:
        raise ExportError(
            f"the tokenizer has {vocab_size} pieces but the weights in {where} have only {rows} embedding "
            "rows: this tokenizer does not belong to these weights (for example the adapted tokenizer with "
            "the base model's weights); pass the tokenizer the model was trained with."
        )
    if rows not in allowed:
        raise ExportError(
            f"the weights in {where} have {rows} embedding rows, which is not the tokenizer's {vocab_size} "
            f"pieces padded for tensor parallelism (one of {allowed}): this tokenizer does not belong to "
            "these weights (for example the base tokenizer with the adapted model); pass the tokenizer "
            "the model was trained with."
        )
    return rows - vocab_size


# --- the source's own record of its tokenizer --------------------------------------------------------


def _is_nemo_checkpoint(source: Path) -> bool:
    return (source.is_file() and source.suffix == ".nemo") or (source / NEMO_CONFIG).is_file()


def _stream_sha256(handle: IO[bytes], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def _nemo_tokenizer_entry(model_config: Any, names: set[str]) -> str | None:
    """The tokenizer file a NeMo model config names, resolved as NeMo's register_artifact does.

    Returns an existing local path (NeMo prefers one), an entry of the checkpoint (``nemo:`` names, or the
    plain file name for older checkpoints) prefixed with ``nemo:``, or None when the config names none.
    """
    tokenizer = model_config.get("tokenizer") if isinstance(model_config, dict) else None
    value = tokenizer.get("model") if isinstance(tokenizer, dict) else None
    if not isinstance(value, str) or not value:
        return None
    if value.startswith(NEMO_ARTIFACT_PREFIX):
        return value if value[len(NEMO_ARTIFACT_PREFIX):] in names else None
    if Path(value).is_file():
        return value
    return NEMO_ARTIFACT_PREFIX + Path(value).name if Path(value).name in names else None


def _parse_nemo_config(text: bytes, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ExportError(f"{where} is not valid YAML ({error}); is the checkpoint complete?") from None


def nemo_tokenizer_record(source: Path) -> tuple[str, str] | None:
    """SHA-256 and location of the tokenizer model a NeMo checkpoint carries; None if it names none."""
    source = Path(source)
    if source.is_dir():
        config_path = source / NEMO_CONFIG
        names = {entry.name for entry in source.iterdir() if entry.is_file()}
        entry = _nemo_tokenizer_entry(_parse_nemo_config(config_path.read_bytes(), str(config_path)), names)
        if entry is None:
            return None
        path = source / entry[len(NEMO_ARTIFACT_PREFIX):] if entry.startswith(NEMO_ARTIFACT_PREFIX) else Path(entry)
        return file_sha256(path), str(path)
    try:
        with tarfile.open(source, "r:*") as archive:
            members = {member.name.removeprefix("./"): member for member in archive.getmembers() if member.isfile()}
            config_member = members.get(NEMO_CONFIG)
            if config_member is None:
                raise ExportError(f"--source {source} holds no {NEMO_CONFIG}; it is not a NeMo checkpoint.")
            if config_member.size > MAX_NEMO_CONFIG_BYTES:
                raise ExportError(f"{NEMO_CONFIG} in {source} has {config_member.size} bytes; a NeMo model "
                                  "config has a few kilobytes: the checkpoint is damaged.")
            model_config = _parse_nemo_config(archive.extractfile(config_member).read(), f"{NEMO_CONFIG} in {source}")
            entry = _nemo_tokenizer_entry(model_config, set(members))
            if entry is None:
                return None
            if not entry.startswith(NEMO_ARTIFACT_PREFIX):
                return file_sha256(entry), entry
            name = entry[len(NEMO_ARTIFACT_PREFIX):]
            return _stream_sha256(archive.extractfile(members[name])), f"{source}:{name}"
    except (tarfile.TarError, EOFError) as error:
        raise ExportError(f"--source {source} is not a readable .nemo archive ({error}); a .nemo is the tar "
                          "file NeMo saves at the end of training.") from None


def manifest_tokenizer_record(folder: Path) -> tuple[str, str] | None:
    """The tokenizer SHA-256 the ``train``/``embeddings`` stage recorded in ``folder``'s manifest, if any."""
    manifest = read_manifest(folder) if folder.is_dir() else None
    keys = MANIFEST_TOKENIZER_RECORDS.get((manifest or {}).get("stage"))
    if keys is None:
        return None
    value: Any = manifest.get("inputs")
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return (value, f"{folder / 'manifest.json'} ({manifest['stage']} stage)") if isinstance(value, str) else None


def source_tokenizer_records(source: Path) -> list[tuple[str, str]]:
    """Every record the source keeps of the tokenizer it was trained with: (SHA-256, where)."""
    if _is_nemo_checkpoint(source):
        record = nemo_tokenizer_record(source)
        return [record] if record else []
    records = []
    own = source / "tokenizer.model"
    if own.is_file():
        records.append((file_sha256(own), str(own)))
    record = manifest_tokenizer_record(source)
    if record:
        records.append(record)
    return records


def check_source_tokenizer(source: Path, tokenizer: TokenizerInfo, allow_unverified: bool = False) -> dict:
    """Refuse a tokenizer that is not the one the source was trained with; return what was compared."""
    given = tokenizer.folder / "tokenizer.model"
    records = source_tokenizer_records(source)
    for sha256, where in records:
        if sha256 != tokenizer.sha256:
            raise ExportError(
                f"--tokenizer {tokenizer.folder}: its tokenizer.model (sha256 {tokenizer.sha256[:12]}...) is not "
                f"the tokenizer the model in {source} was trained with ({where}: sha256 {sha256[:12]}...), even "
                "if both have the same number of pieces; pass the folder of the tokenizer the model was "
                "trained with (`python -m dapt tokenizer`'s output for this run)."
            )
    if records:
        return {"passed": True, "sha256": tokenizer.sha256, "compared_with": [where for _, where in records]}
    if not allow_unverified:
        raise ExportError(
            f"--source {source} keeps no record of its tokenizer (no tokenizer.model, no packed tokenizer, no "
            f"manifest of this project's train stage), so nothing shows that {given} belongs to these weights. "
            "Copy the tokenizer.model the model was trained with into the source folder, or pass "
            "--allow-unverified-tokenizer if you are sure."
        )
    return {"passed": True, "sha256": tokenizer.sha256, "compared_with": [],
            "unverified": "the source records no tokenizer; accepted with --allow-unverified-tokenizer"}


# --- loading the source --------------------------------------------------------------------------------


def nemo_to_hf_command(nemo_checkpoint: Path, weights_out: Path, nemo_root: Path,
                       precision: str = "auto", cpu_only: bool = False) -> list[str]:
    """The NeMo converter call that writes the checkpoint's weights as an HF state dict (``.bin``).

    Arguments as defined in ``get_args()`` of NVIDIA/NeMo
    ``scripts/checkpoint_converters/convert_llama_nemo_to_hf.py`` (r2.0.0rc1, the NeMo 24.07 container):
    ``--input_name_or_path`` (.nemo file or extracted folder), ``--output_path`` (HF .bin file),
    ``--precision`` (32, 16, bf16; default: the checkpoint's), ``--cpu-only``. Its other mode
    (``--hf_input_path/--hf_output_path/--input_tokenizer``) resizes the HF model to the tokenizer's length
    and then loads the state dict, which fails when Megatron padded the vocabulary; so only the weights are
    converted there and this module strips the padding rows and writes the folder.
    """
    command = [sys.executable, str(Path(nemo_root) / NEMO_CONVERTER),
               "--input_name_or_path", str(nemo_checkpoint), "--output_path", str(weights_out)]
    if precision in NEMO_PRECISION:
        command += ["--precision", NEMO_PRECISION[precision]]
    if cpu_only:
        command.append("--cpu-only")
    return command


def _nemo_available(nemo_root: Path) -> bool:
    return importlib.util.find_spec("nemo") is not None and (Path(nemo_root) / NEMO_CONVERTER).is_file()


def _load_hf_source(source: Path, precision: str, placement: Placement) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if not (source / "config.json").is_file():
        raise ExportError(
            f"--source {source} is neither an HF model folder (no config.json) nor a .nemo checkpoint; "
            "pass the trained model (outputs/<profile>/dapt_model on CPU)."
        )
    dtype = "auto" if precision == "auto" else getattr(torch, precision)
    kwargs = {**load_kwargs(placement), **dtype_argument(dtype)}  # the weights keep their dtype in the export
    return AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)


def _dispatch(model: Any, placement: Placement) -> Any:
    """Spread a model built in CPU memory over the visible GPUs, as ``from_pretrained(device_map="auto")`` does."""
    if placement.device_map is None:
        return model
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=model.dtype)
    return dispatch_model(model, device_map=device_map)


def _load_nemo_source(source: Path, config: ExportConfig, workdir: Path, placement: Placement) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.base_hf_model is None or not (Path(config.base_hf_model) / "config.json").is_file():
        raise ExportError(
            f"--source {source} is a NeMo checkpoint: pass --base-hf-model with the base model's HF folder "
            f"(for example Llama-2-7b-hf; {config.base_hf_model} has no config.json); its config.json "
            "describes the architecture."
        )
    weights = workdir / "nemo_weights.bin"
    cpu_only = not torch.cuda.is_available()
    command = nemo_to_hf_command(source, weights, config.nemo_root, config.precision, cpu_only)
    if not _nemo_available(config.nemo_root):
        raise ExportError(
            f"--source {source} is a NeMo checkpoint, and converting it needs NeMo, which this machine does "
            f"not have (no `nemo` package or no {Path(config.nemo_root) / NEMO_CONVERTER}). Run this stage "
            "inside the NeMo 24.07 container; it runs:\n  " + " ".join(command)
        )
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    hf_config = AutoConfig.from_pretrained(config.base_hf_model, local_files_only=True)
    hf_config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    dtype = state["model.embed_tokens.weight"].dtype
    model = AutoModelForCausalLM.from_config(hf_config, **dtype_argument(dtype))
    model.load_state_dict(state, strict=True)
    del state
    return _dispatch(model, placement)


def _heldout_texts(heldout: Path, max_docs: int, max_chars: int) -> list[str]:
    """Up to ``max_docs`` held-out texts, spread evenly over the JSONL files (domain and general alike)."""
    files = find_jsonl_files(heldout)
    per_file = max(1, max_docs // len(files))
    texts: list[str] = []
    for file in files:
        for count, doc in enumerate(iter_documents(file)):
            if count >= per_file:
                break
            texts.append(doc.text[:max_chars])
    return texts[:max_docs]


def _probe_ids(tokenizer: TokenizerInfo, texts: list[str], length: int) -> list[int]:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    processor.Load(str(tokenizer.folder / "tokenizer.model"))
    ids = [tokenizer.bos_id]
    for text in texts:
        ids += processor.EncodeAsIds(text)
        if len(ids) >= length:
            break
    return ids[:length]


# --- computing in the chosen precision -----------------------------------------------------------------


@contextlib.contextmanager
def computing_in(model: Any, placement: Placement) -> Iterator[Any]:
    """Run ``model``'s forward passes in the placement's precision; yields the dtype they run in.

    On the CPU: float32; weights stored in bf16/fp16 are cast up in place (exactly) and back afterwards (only
    the parameters: buffers such as the rotary frequencies stay as loaded). On GPUs: the weights' own dtype
    when it is as narrow as the placement's (bf16 weights in bf16), else autocast to the placement's dtype
    (float32 weights computed in bf16), so source and export run the same way.
    """
    import torch

    stored = model.dtype
    if placement.device_map is None:
        parameters = [p for p in model.parameters() if p.dtype != torch.float32]
        originals = [p.dtype for p in parameters]
        for parameter in parameters:
            parameter.data = parameter.data.float()
        try:
            yield torch.float32
        finally:
            for parameter, dtype in zip(parameters, originals):
                parameter.data = parameter.data.to(dtype)
    elif placement.dtype.itemsize < stored.itemsize:
        with torch.autocast("cuda", dtype=placement.dtype):
            yield placement.dtype
    else:
        yield stored


def _logits(model: Any, ids: list[int], vocab_size: int, placement: Placement) -> tuple[Any, Any]:
    """Logits of ``ids`` (float32, on the CPU) and the dtype they were computed in."""
    import torch

    with torch.no_grad(), computing_in(model, placement) as dtype:
        logits = model(torch.tensor([ids], device=input_device(model))).logits
    return logits[0, :, :vocab_size].float().cpu(), dtype


def logit_tolerance(dtype: Any, reference: Any, float32_tolerance: float) -> tuple[float, str]:
    """The largest logit difference accepted for computation in ``dtype``, and its rule in words."""
    import torch

    if dtype == torch.float32:
        return float32_tolerance, "float32: --logits-tolerance"
    eps = torch.finfo(dtype).eps
    largest = max(1.0, float(reference.abs().max()))
    return (REDUCED_PRECISION_ULPS * eps * largest,
            f"{str(dtype).removeprefix('torch.')}: {REDUCED_PRECISION_ULPS} x eps ({eps:g}) x max(1, largest "
            f"|reference logit| = {largest:.4g})")


def _strip_padding_rows(model: Any, tokenizer: TokenizerInfo) -> None:
    model.resize_token_embeddings(tokenizer.vocab_size)
    model.config.vocab_size = tokenizer.vocab_size
    for holder in (model.config, model.generation_config):
        holder.bos_token_id = tokenizer.bos_id
        holder.eos_token_id = tokenizer.eos_id


def _copy_tokenizer(tokenizer: TokenizerInfo, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer.folder / name, folder / name)
    record, renamed = ADDED_TOKENS_RECORD
    if (tokenizer.folder / record).is_file():
        shutil.copyfile(tokenizer.folder / record, folder / renamed)
    # The chat template goes into tokenizer_config.json (where transformers 4.40 and vLLM read it).
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = LLAMA2_CHAT_TEMPLATE
    write_json(config_path, tokenizer_config)


def export(config: ExportConfig) -> dict:
    """Write the HF export for NIM (safetensors, adapted tokenizer, chat template) and verify it."""
    check_config(config)
    source, tokenizer_folder, output, max_tp = _resolve(config)
    tokenizer = load_tokenizer_info(tokenizer_folder)
    if not source.exists():
        raise ExportError(
            f"--source {source} does not exist; train first (`python -m dapt train`) or pass the trained model."
        )
    kind = "nemo" if _is_nemo_checkpoint(source) else "hf"
    tokenizer_check = check_source_tokenizer(source, tokenizer, config.allow_unverified_tokenizer)
    placement = choose_device_and_dtype(config.device)
    texts = _heldout_texts(config.heldout, config.heldout_docs, config.heldout_chars)
    with tempfile.TemporaryDirectory(prefix="dapt-export-") as workdir:
        if kind == "nemo":
            model = _load_nemo_source(source, config, Path(workdir), placement)
        else:
            model = _load_hf_source(source, config.precision, placement)
    rows = model.get_input_embeddings().weight.shape[0]
    padding = check_vocab_rows(rows, tokenizer.vocab_size, max_tp, str(source))
    probe = _probe_ids(tokenizer, texts, config.probe_tokens)
    reference, _ = _logits(model, probe, tokenizer.vocab_size, placement)
    _strip_padding_rows(model, tokenizer)
    inputs = {
        "source": {"path": str(source), "kind": kind, "stage": (read_manifest(source) or {}).get("stage")
                   if source.is_dir() else None},
        "tokenizer": {"path": str(tokenizer.folder), "sha256": tokenizer.sha256,
                      "stage": (read_manifest(tokenizer.folder) or {}).get("stage")},
    }
    with stage_output(output, "export", config, inputs) as folder:
        model.save_pretrained(folder, safe_serialization=True)
        del model
        _copy_tokenizer(tokenizer, folder)
        report = verify_export(folder, texts=texts, reference_logits=reference, probe_ids=probe,
                               tolerance=config.logits_tolerance, generate_tokens=config.generate_tokens,
                               prompt=config.prompt, placement=placement,
                               repetition_penalty=config.repetition_penalty)
        report["checks"]["source_tokenizer"] = tokenizer_check
        report["source"] = {"kind": kind, "embedding_rows": rows, "padding_rows_stripped": padding}
        write_json(folder / "verify.json", report)
        if not report["passed"]:
            failed = [name for name, check in report["checks"].items() if not check["passed"]]
            raise ExportError(
                f"the export failed verification ({', '.join(failed)}); nothing was written to {output}. "
                "Details: " + json.dumps({name: report["checks"][name] for name in failed})[:2000]
            )
    print(json.dumps({"output": str(output), "passed": report["passed"], "padding_rows_stripped": padding,
                      "verified_on": placement.description,
                      **{name: check["passed"] for name, check in report["checks"].items()}}, indent=2))
    return report


# --------------------------------------------------------------------------------------------------
# verification
# --------------------------------------------------------------------------------------------------


def _weight_rows(folder: Path) -> dict[str, int]:
    """Rows of the embedding and output matrices, read from the safetensors headers without loading them."""
    from safetensors import safe_open

    rows = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    rows[name] = handle.get_slice(name).get_shape()[0]
    return rows


def _check_files(folder: Path) -> dict:
    missing = [name for name in (*TOKENIZER_FILES, "config.json") if not (folder / name).is_file()]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    has_safetensors = any(folder.glob("*.safetensors"))
    return {"passed": not missing and not pickles and has_safetensors, "missing": missing,
            "pickle_weights": pickles, "safetensors": has_safetensors}


def _check_vocab(folder: Path, hf_tokenizer: Any, processor: Any) -> dict:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    rows = _weight_rows(folder)
    sizes = {"config.vocab_size": config.get("vocab_size"), "sentencepiece": processor.GetPieceSize(),
             "hf_tokenizer": len(hf_tokenizer), **rows}
    return {"passed": len(set(sizes.values())) == 1, "sizes": sizes}


def _check_token_ids(hf_tokenizer: Any, processor: Any, texts: list[str]) -> dict:
    mismatches = []
    for index, text in enumerate(texts):
        hf_ids = hf_tokenizer.encode(text, add_special_tokens=False)
        sp_ids = processor.EncodeAsIds(text)
        if hf_ids != sp_ids:
            pairs = enumerate(zip(hf_ids, sp_ids, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(hf_ids), len(sp_ids)))
            mismatches.append({"document": index, "first_difference_at_token": first,
                               "hf": hf_ids[first:first + 5], "sentencepiece": sp_ids[first:first + 5]})
    with_specials = hf_tokenizer.encode("x")
    bos_ok = with_specials[:1] == [processor.bos_id()]
    return {"passed": bool(texts) and not mismatches and bos_ok, "documents": len(texts),
            "mismatched_documents": len(mismatches), "examples": mismatches[:3], "hf_adds_bos": bos_ok}


def _check_logits(model: Any, reference: Any, probe_ids: list[int], tolerance: float,
                  placement: Placement) -> dict:
    """The export's logits against the source's, computed the same way, within the precision's tolerance.

    The argmax must agree at every position whose two largest reference logits differ by more than the
    tolerance (where they nearly tie, rounding may pick either).
    """
    exported, dtype = _logits(model, probe_ids, reference.shape[-1], placement)
    allowed, rule = logit_tolerance(dtype, reference, tolerance)
    difference = float((exported - reference).abs().max())
    top2 = reference.topk(2, dim=-1).values if reference.shape[-1] > 1 else reference.repeat(1, 2)
    decided = (top2[:, 0] - top2[:, 1]) > allowed
    same_argmax = bool((exported.argmax(-1) == reference.argmax(-1))[decided].all())
    return {"passed": difference <= allowed and same_argmax, "max_abs_difference": difference,
            "tolerance": allowed, "tolerance_rule": rule, "computed_in": str(dtype).removeprefix("torch."),
            "tokens": len(probe_ids), "same_argmax": same_argmax,
            "argmax_positions_compared": int(decided.sum())}


def _check_generation(model: Any, hf_tokenizer: Any, prompt: str, new_tokens: int, placement: Placement,
                      repetition_penalty: float = 1.0) -> dict:
    import torch

    encoded = hf_tokenizer(prompt, return_tensors="pt").to(input_device(model))
    with torch.no_grad(), computing_in(model, placement):
        output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False,
                                repetition_penalty=repetition_penalty, pad_token_id=hf_tokenizer.eos_token_id)
    generated = output[0, encoded["input_ids"].shape[1]:].tolist()
    in_range = all(0 <= token < len(hf_tokenizer) for token in generated)
    return {"passed": bool(generated) and in_range, "new_tokens": len(generated), "ids": generated,
            "prompt": prompt, "repetition_penalty": repetition_penalty,
            "text": hf_tokenizer.decode(generated, skip_special_tokens=False)}


def _check_chat_template(hf_tokenizer: Any, processor: Any) -> dict:
    """The template's token ids for a system + user turn equal Meta's Llama 2 chat format built with SentencePiece."""
    system, question = "You answer questions about chip design.", "What does a flip-flop store?"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    try:
        rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = list(hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    except Exception as error:  # any template error makes the chat endpoint unusable
        return {"passed": False, "error": f"{type(error).__name__}: {error}"}
    expected = [processor.bos_id(), *processor.encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{question} [/INST]")]
    return {"passed": ids == expected, "rendered": rendered, "tokens": len(ids), "meta_format_tokens": len(expected)}


def verify_export(folder: Path, texts: list[str] | None = None, heldout: Path | None = None,
                  max_docs: int = 64, max_chars: int = 4000, reference_logits: Any = None,
                  probe_ids: list[int] | None = None, tolerance: float = 1e-4, generate_tokens: int = 16,
                  prompt: str = DEFAULT_PROMPT, placement: Placement | None = None,
                  repetition_penalty: float = 1.0) -> dict:
    """Check an exported folder; returns ``{"passed": bool, "placement": str, "checks": {...}}``.

    Checks: the files (safetensors, tokenizer files, no pickles); one vocabulary size across config.json,
    weights, SentencePiece and the HF tokenizer; HF token ids equal SentencePiece ids on held-out text
    (``texts``, or read from ``heldout``); the chat template gives Meta's Llama 2 chat token ids; greedy
    generation runs; and, where ``reference_logits`` (the source weights' logits on ``probe_ids``, computed
    with the same ``placement``) are given, the exported model's logits match within the tolerance of the
    precision they were computed in (``tolerance`` for float32). ``placement`` defaults to
    :func:`dapt.device.choose_device_and_dtype`'s choice.
    """
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement or choose_device_and_dtype()
    folder = Path(folder)
    report: dict[str, Any] = {"passed": False, "placement": placement.description, "checks": {}}
    checks = report["checks"]
    checks["files"] = _check_files(folder)
    if checks["files"]["missing"]:
        return report
    if texts is None:
        texts = _heldout_texts(Path(heldout or DEFAULT_HELDOUT), max_docs, max_chars)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = spm.SentencePieceProcessor()
    processor.Load(str(folder / "tokenizer.model"))
    checks["vocab_size"] = _check_vocab(folder, hf_tokenizer, processor)
    checks["token_ids"] = _check_token_ids(hf_tokenizer, processor, texts)
    checks["chat_template"] = _check_chat_template(hf_tokenizer, processor)
    try:
        kwargs = {**load_kwargs(placement), **dtype_argument("auto")}  # the export's own dtype
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        checks["loads"] = {"passed": False, "error": f"{type(error).__name__}: {error}"[:1000]}
        return report
    checks["loads"] = {"passed": True, "class": type(model).__name__, "dtype": str(model.dtype),
                       "parameters": sum(p.numel() for p in model.parameters())}
    model.eval()
    checks["generation"] = _check_generation(model, hf_tokenizer, prompt, generate_tokens, placement,
                                             repetition_penalty)
    if reference_logits is not None and probe_ids is not None:
        checks["logits"] = _check_logits(model, reference_logits, probe_ids, tolerance, placement)
    else:
        checks["logits"] = {"passed": True, "skipped": "no readable source weights given"}
    report["logit_tolerances"] = {
        "float32": f"--logits-tolerance ({tolerance:g})",
        "bfloat16": f"{REDUCED_PRECISION_ULPS} x 2^-7 x max(1, largest |reference logit|)",
        "float16": f"{REDUCED_PRECISION_ULPS} x 2^-10 x max(1, largest |reference logit|)",
    }
    report["passed"] = all(check["passed"] for check in checks.values())
    return report
