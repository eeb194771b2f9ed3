"""Export the adapted model as a Hugging Face folder for NIM, verify it, and smoke-test a served model.

Two stages live here:

* ``export``: the trained weights (an HF folder from the CPU engine, or a NeMo ``.nemo`` checkpoint inside
  the NeMo container) become an HF folder that NIM's fine-tuned-model flow can serve: safetensors weights,
  ``config.json`` whose ``vocab_size`` equals the weights' rows, the ADAPTED tokenizer files with a
  Llama-2-style chat template, and ``verify.json``, the result of :func:`verify_export`.
* ``smoke-test``: completion and chat requests to an OpenAI-compatible endpoint (NIM, or a local server),
  checking the answers' shape and that the exported tokenizer round-trips the text and counts the prompt's
  tokens as the server does.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dapt.artifacts import file_sha256, read_manifest, stage_output, write_json
from dapt.config import DEFAULT_OUTPUTS, get_profile, param
from dapt.corpus import DEFAULT_HELDOUT, find_jsonl_files, iter_documents
from dapt.errors import UserInputError

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


class ExportError(UserInputError):
    """The export's inputs do not fit together, or the exported folder failed verification."""


class SmokeTestError(UserInputError):
    """The endpoint's answers fail the smoke test's checks."""


class EndpointUnreachable(SmokeTestError):
    """No server answers at the given address."""


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
        None, "largest TP size the training may have padded the vocabulary for; default: the profile's")
    heldout: Path = param(DEFAULT_HELDOUT, "held-out JSONL (file or folder) for the tokenizer check")
    heldout_docs: int = param(64, "held-out documents compared between the HF and SentencePiece tokenizers")
    heldout_chars: int = param(4000, "characters of each held-out document compared")
    logits_tolerance: float = param(1e-4, "largest absolute logit difference between source and export")
    probe_tokens: int = param(64, "tokens of held-out text used for the logit comparison")
    generate_tokens: int = param(16, "tokens generated greedily to check that generation runs")
    prompt: str = param("module counter (input logic clk", "prompt for the generation check")


@dataclass
class TokenizerInfo:
    """What the export needs to know about the adapted tokenizer folder."""

    folder: Path
    vocab_size: int
    bos_id: int
    eos_id: int
    sha256: str


def _resolve(config: ExportConfig) -> tuple[Path, Path, Path, int]:
    profile = get_profile(config.profile)
    root = DEFAULT_OUTPUTS / profile.name
    source = Path(config.source) if config.source else root / "dapt_model"
    tokenizer = Path(config.tokenizer) if config.tokenizer else root / "tokenizer"
    output = Path(config.output) if config.output else root / "export"
    max_tp = config.max_tensor_parallel or profile.max_tensor_parallel
    return source, tokenizer, output, max_tp


def load_tokenizer_info(folder: Path) -> TokenizerInfo:
    """Check that ``folder`` is a complete tokenizer folder and read its SentencePiece model."""
    import sentencepiece as spm

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(
            f"tokenizer folder {folder} does not exist; pass --tokenizer with the adapted tokenizer folder "
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


def _check_source_tokenizer(source: Path, tokenizer: TokenizerInfo) -> None:
    """An HF source folder that carries its own tokenizer.model must carry the same one."""
    own = source / "tokenizer.model"
    if source.is_dir() and own.is_file() and file_sha256(own) != tokenizer.sha256:
        raise ExportError(
            f"{own} differs from {tokenizer.folder / 'tokenizer.model'}: the model was trained with another "
            "tokenizer; pass that tokenizer's folder with --tokenizer."
        )


def _is_nemo_checkpoint(source: Path) -> bool:
    return (source.is_file() and source.suffix == ".nemo") or (source / "model_config.yaml").is_file()


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


def _load_hf_source(source: Path, precision: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if not (source / "config.json").is_file():
        raise ExportError(
            f"source {source} is neither an HF model folder (no config.json) nor a .nemo checkpoint; "
            "pass --source with the trained model (outputs/<profile>/dapt_model on CPU)."
        )
    dtype = "auto" if precision == "auto" else getattr(torch, precision)
    return AutoModelForCausalLM.from_pretrained(source, torch_dtype=dtype, local_files_only=True)


def _load_nemo_source(source: Path, config: ExportConfig, workdir: Path) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.base_hf_model is None or not (Path(config.base_hf_model) / "config.json").is_file():
        raise ExportError(
            f"source {source} is a NeMo checkpoint: pass --base-hf-model with the base model's HF folder "
            "(for example Llama-2-7b-hf); its config.json describes the architecture."
        )
    weights = workdir / "nemo_weights.bin"
    cpu_only = not torch.cuda.is_available()
    command = nemo_to_hf_command(source, weights, config.nemo_root, config.precision, cpu_only)
    if not _nemo_available(config.nemo_root):
        raise ExportError(
            f"source {source} is a NeMo checkpoint, and converting it needs NeMo, which this machine does "
            f"not have (no `nemo` package or no {Path(config.nemo_root) / NEMO_CONVERTER}). Run this stage "
            "inside the NeMo 24.07 container; it runs:\n  " + " ".join(command)
        )
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    hf_config = AutoConfig.from_pretrained(config.base_hf_model, local_files_only=True)
    hf_config.vocab_size = state["model.embed_tokens.weight"].shape[0]
    dtype = state["model.embed_tokens.weight"].dtype
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model


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


def _logits(model: Any, ids: list[int], vocab_size: int) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :, :vocab_size].float()


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
    source, tokenizer_folder, output, max_tp = _resolve(config)
    tokenizer = load_tokenizer_info(tokenizer_folder)
    if not source.exists():
        raise ExportError(
            f"source {source} does not exist; train first (`python -m dapt train`) or pass --source."
        )
    texts = _heldout_texts(config.heldout, config.heldout_docs, config.heldout_chars)
    with tempfile.TemporaryDirectory(prefix="dapt-export-") as workdir:
        if _is_nemo_checkpoint(source):
            kind = "nemo"
            model = _load_nemo_source(source, config, Path(workdir))
        else:
            kind = "hf"
            _check_source_tokenizer(source, tokenizer)
            model = _load_hf_source(source, config.precision)
    rows = model.get_input_embeddings().weight.shape[0]
    padding = check_vocab_rows(rows, tokenizer.vocab_size, max_tp, str(source))
    probe = _probe_ids(tokenizer, texts, config.probe_tokens)
    reference = _logits(model, probe, tokenizer.vocab_size)
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
                               prompt=config.prompt)
        report["source"] = {"kind": kind, "embedding_rows": rows, "padding_rows_stripped": padding}
        write_json(folder / "verify.json", report)
        if not report["passed"]:
            failed = [name for name, check in report["checks"].items() if not check["passed"]]
            raise ExportError(
                f"the export failed verification ({', '.join(failed)}); nothing was written to {output}. "
                "Details: " + json.dumps({name: report["checks"][name] for name in failed})[:2000]
            )
    print(json.dumps({"output": str(output), "passed": report["passed"], "padding_rows_stripped": padding,
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


def _check_logits(model: Any, reference: Any, probe_ids: list[int], tolerance: float) -> dict:
    exported = _logits(model, probe_ids, reference.shape[-1])
    difference = float((exported - reference).abs().max())
    same_argmax = bool((exported.argmax(-1) == reference.argmax(-1)).all())
    return {"passed": difference <= tolerance and same_argmax, "max_abs_difference": difference,
            "tolerance": tolerance, "tokens": len(probe_ids), "same_argmax": same_argmax}


def _check_generation(model: Any, hf_tokenizer: Any, prompt: str, new_tokens: int) -> dict:
    import torch

    encoded = hf_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=hf_tokenizer.eos_token_id)
    generated = output[0, encoded["input_ids"].shape[1]:].tolist()
    in_range = all(0 <= token < len(hf_tokenizer) for token in generated)
    return {"passed": bool(generated) and in_range, "new_tokens": len(generated), "ids": generated,
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
                  prompt: str = "module counter (input logic clk") -> dict:
    """Check an exported folder; returns ``{"passed": bool, "checks": {...}}``.

    Checks: the files (safetensors, tokenizer files, no pickles); one vocabulary size across config.json,
    weights, SentencePiece and the HF tokenizer; HF token ids equal SentencePiece ids on held-out text
    (``texts``, or read from ``heldout``); the chat template gives Meta's Llama 2 chat token ids; greedy
    generation runs; and, where ``reference_logits`` (the source weights' logits on ``probe_ids``) are given,
    the exported model's logits match within ``tolerance``.
    """
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    checks: dict[str, dict] = {"files": _check_files(folder)}
    if checks["files"]["missing"]:
        return {"passed": False, "checks": checks}
    if texts is None:
        texts = _heldout_texts(Path(heldout or DEFAULT_HELDOUT), max_docs, max_chars)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = spm.SentencePieceProcessor()
    processor.Load(str(folder / "tokenizer.model"))
    checks["vocab_size"] = _check_vocab(folder, hf_tokenizer, processor)
    checks["token_ids"] = _check_token_ids(hf_tokenizer, processor, texts)
    checks["chat_template"] = _check_chat_template(hf_tokenizer, processor)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="auto", local_files_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        checks["loads"] = {"passed": False, "error": f"{type(error).__name__}: {error}"[:1000]}
        return {"passed": False, "checks": checks}
    checks["loads"] = {"passed": True, "class": type(model).__name__,
                       "parameters": sum(p.numel() for p in model.parameters())}
    model.eval()
    checks["generation"] = _check_generation(model, hf_tokenizer, prompt, generate_tokens)
    if reference_logits is not None and probe_ids is not None:
        checks["logits"] = _check_logits(model, reference_logits, probe_ids, tolerance)
    else:
        checks["logits"] = {"passed": True, "skipped": "no readable source weights given"}
    return {"passed": all(check["passed"] for check in checks.values()), "checks": checks}


# --------------------------------------------------------------------------------------------------
# smoke test of a served model
# --------------------------------------------------------------------------------------------------

REQUEST_KINDS = ("completion", "chat")


@dataclass
class SmokeTestConfig:
    """Where the OpenAI-compatible endpoint is and what to send it."""

    base_url: str = param("http://127.0.0.1:8000/v1", "endpoint root, ending in /v1 (NIM's port is 8000)")
    model: str | None = param(None, "served model name (NIM_SERVED_MODEL_NAME); default: the first one "
                                       "GET /v1/models lists")
    tokenizer: Path | None = param(None, "exported folder: checks the tokenizer round trip and that the "
                                            "server counts prompt tokens as this tokenizer does")
    requests: tuple[str, ...] = param(REQUEST_KINDS, "requests to send: completion and/or chat")
    stream: bool = param(False, "ask for server-sent-event streaming")
    prompt: str = param("module counter (input logic clk", "completion prompt and chat question")
    max_tokens: int = param(16, "tokens to generate per request")
    timeout_s: float = param(120.0, "seconds to wait for each HTTP request")
    api_key: str | None = param(None, "bearer token, where the endpoint needs one")
    output: Path | None = param(None, "folder for smoke_test.json (none: print only)")


def _http(method: str, url: str, payload: dict | None, timeout: float,
          api_key: str | None) -> tuple[int, str, bytes]:
    """One HTTP request; returns (status, content type, body). An unreachable server raises SmokeTestError."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Accept": "application/json, text/event-stream"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise EndpointUnreachable(
            f"cannot reach {url}: {reason}. Is the server running, and does --base-url point to it "
            "(scheme, host, port, ending in /v1)?"
        ) from None


def parse_event_stream(body: bytes) -> list[dict]:
    """The JSON payloads of a server-sent-event body (``data: {...}`` lines; ``[DONE]`` ends it)."""
    events = []
    for line in body.decode("utf-8").splitlines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        if data:
            events.append(json.loads(data))
    return events


def merge_stream(kind: str, events: list[dict]) -> dict:
    """Fold streamed chunks into one answer of the non-streaming shape."""
    text, role, finish, usage = [], None, None, None
    for event in events:
        if "error" in event:  # a server that fails mid-stream says so in an event (HTTP status is already 200)
            raise SmokeTestError(f"the {kind} stream broke off after {len(text)} chunks with the server's "
                                 f"error: {json.dumps(event['error'])[:500]}")
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            if kind == "completion":
                text.append(choice.get("text") or "")
            else:
                delta = choice.get("delta") or {}
                role = delta.get("role") or role
                text.append(delta.get("content") or "")
            finish = choice.get("finish_reason") or finish
    if finish is None:
        raise SmokeTestError(f"the {kind} stream ended without a final chunk (no finish_reason in "
                             f"{len(events)} events)")
    if kind == "completion":
        choice = {"text": "".join(text), "finish_reason": finish}
    else:
        choice = {"message": {"role": role, "content": "".join(text)}, "finish_reason": finish}
    return {"object": events[0].get("object") if events else None, "choices": [choice], "usage": usage,
            "streamed_chunks": len(events)}


def answer_text(kind: str, answer: dict) -> str:
    """The generated text of a completion or chat answer; SmokeTestError when its shape is wrong."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise SmokeTestError(f"{kind} answer has no choices list: {json.dumps(answer)[:500]}")
    choice = choices[0]
    if kind == "completion":
        text = choice.get("text")
    else:
        message = choice.get("message")
        if not isinstance(message, dict) or message.get("role") != "assistant":
            raise SmokeTestError(f"chat answer's message is not the assistant's: {json.dumps(choice)[:500]}")
        text = message.get("content")
    if not isinstance(text, str):
        raise SmokeTestError(f"{kind} answer carries no generated text: {json.dumps(choice)[:500]}")
    if not text and choice.get("finish_reason") != "stop":
        raise SmokeTestError(f"{kind} answer is empty, yet generation did not stop: "
                             f"{json.dumps(choice)[:500]}")
    return text


def _request_payload(kind: str, model: str, config: SmokeTestConfig) -> tuple[str, dict, Any]:
    common = {"model": model, "max_tokens": config.max_tokens, "temperature": 0.0, "stream": config.stream}
    if kind == "completion":
        return "completions", {**common, "prompt": config.prompt}, config.prompt
    messages = [{"role": "user", "content": config.prompt}]
    return "chat/completions", {**common, "messages": messages}, messages


def _send(kind: str, model: str, config: SmokeTestConfig) -> tuple[dict, Any]:
    route, payload, prompt = _request_payload(kind, model, config)
    url = f"{config.base_url.rstrip('/')}/{route}"
    status, content_type, body = _http("POST", url, payload, config.timeout_s, config.api_key)
    if status != 200:
        raise SmokeTestError(f"POST {url} answered HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
    if content_type.startswith("text/event-stream"):
        answer = merge_stream(kind, parse_event_stream(body))
    else:
        try:
            answer = json.loads(body)
        except json.JSONDecodeError:
            raise SmokeTestError(f"POST {url} answered with non-JSON: {body[:300]!r}") from None
    return answer, prompt


def _served_models(config: SmokeTestConfig) -> list[str]:
    url = f"{config.base_url.rstrip('/')}/models"
    status, _, body = _http("GET", url, None, config.timeout_s, config.api_key)
    if status != 200:
        return []
    try:
        return [entry.get("id") for entry in json.loads(body).get("data", []) if isinstance(entry, dict)]
    except (json.JSONDecodeError, AttributeError):
        return []


def _round_trip(tokenizer: Any, text: str) -> dict:
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return {"passed": back == text, "tokens": len(ids), "text": text, "decoded": back}


def _prompt_tokens(tokenizer: Any, kind: str, prompt: Any) -> int:
    if kind == "completion":
        return len(tokenizer.encode(prompt))
    return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))


def _check_answer(kind: str, answer: dict, prompt: Any, tokenizer: Any, max_tokens: int) -> dict:
    text = answer_text(kind, answer)
    result: dict[str, Any] = {"passed": True, "text": text,
                              "finish_reason": answer["choices"][0].get("finish_reason"),
                              "streamed_chunks": answer.get("streamed_chunks")}
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
    result["usage"] = usage
    if usage and isinstance(usage.get("completion_tokens"), int) and usage["completion_tokens"] > max_tokens:
        result["passed"] = False
        result["error"] = f"server generated {usage['completion_tokens']} tokens > max_tokens {max_tokens}"
    if tokenizer is None:
        return result
    result["round_trip"] = _round_trip(tokenizer, text)
    result["passed"] &= result["round_trip"]["passed"]
    if usage and isinstance(usage.get("prompt_tokens"), int):
        local = _prompt_tokens(tokenizer, kind, prompt)
        result["prompt_tokens"] = {"server": usage["prompt_tokens"], "exported_tokenizer": local,
                                   "passed": usage["prompt_tokens"] == local}
        result["passed"] &= result["prompt_tokens"]["passed"]
    else:
        result["prompt_tokens"] = {"skipped": "the server reported no usage"}
    return result


def smoke_test(config: SmokeTestConfig) -> dict:
    """Send completion and/or chat requests to an OpenAI-compatible endpoint and check the answers."""
    unknown = sorted(set(config.requests) - set(REQUEST_KINDS))
    if unknown or not config.requests:
        raise SmokeTestError(f"--requests takes completion and/or chat; got {list(config.requests)}")
    tokenizer = None
    if config.tokenizer is not None:
        from transformers import AutoTokenizer

        if not (Path(config.tokenizer) / "tokenizer_config.json").is_file():
            raise SmokeTestError(f"--tokenizer {config.tokenizer} holds no tokenizer_config.json; "
                                 "pass the export folder.")
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
    served = _served_models(config)
    model = config.model or (served[0] if served else None)
    if not model:
        raise SmokeTestError(f"{config.base_url}/models lists no model; pass --model with the served name.")
    report: dict[str, Any] = {"base_url": config.base_url, "model": model, "served_models": served,
                              "model_listed": model in served, "checks": {}}
    local_round_trip = _round_trip(tokenizer, config.prompt) if tokenizer is not None else None
    if local_round_trip is not None:
        report["checks"]["prompt_round_trip"] = local_round_trip
    for kind in config.requests:
        try:
            answer, prompt = _send(kind, model, config)
            report["checks"][kind] = _check_answer(kind, answer, prompt, tokenizer, config.max_tokens)
        except EndpointUnreachable:
            raise
        except SmokeTestError as error:
            report["checks"][kind] = {"passed": False, "error": str(error)}
    report["passed"] = all(check["passed"] for check in report["checks"].values())
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if config.output is not None:
        with stage_output(config.output, "smoke-test", config, {"base_url": config.base_url}) as folder:
            write_json(folder / "smoke_test.json", report)
    if not report["passed"]:
        failed = {name: check.get("error", "see the report above")
                  for name, check in report["checks"].items() if not check["passed"]}
        raise SmokeTestError(f"smoke test of {config.base_url} failed: {json.dumps(failed)[:1500]}")
    return report

