"""Base models for CPU work: a miniature Llama pretrained on the general sample, or a llama2.c checkpoint.

Two modes, one stage (``python -m dapt base-model``):

- default: build a small ``LlamaForCausalLM`` (2.4 million parameters with a 2,048-piece vocabulary;
  UNTIED input and output embeddings, like Llama 2) and pretrain it briefly and deterministically on the
  general sample with the tiny base tokenizer. Cached: a rerun with the same parameters and inputs reuses
  the folder.
- ``--llama2c-checkpoint X.bin --llama2c-tokenizer Y.model``: convert a llama2.c checkpoint (for example
  ``stories260K.bin``) into an HF folder. llama2.c rotates interleaved pairs of each head's query/key rows,
  HF Llama rotates the two halves, so query and key rows are permuted on the way.

Both write an HF folder (``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.model`` and the HF tokenizer files) plus ``manifest.json``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dapt.artifacts import StageError, file_sha256, jsonable, read_manifest, stage_output, write_json
from dapt.config import DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS, param
from dapt.errors import UserInputError

STAGE = "base-model"
FORMAT_VERSION = 2  # bump when the output changes for the same parameters, so caches are rebuilt
MAX_SEED = 2**63 - 1


@dataclass
class BaseModelConfig:
    """Parameters of the ``base-model`` stage (tiny pretraining or llama2.c conversion)."""

    output: Path = param(DEFAULT_OUTPUTS / "tiny" / "base_model", "output HF model folder")
    tokenizer: Path = param(
        DEFAULT_OUTPUTS / "tiny" / "base_tokenizer" / "tokenizer.model",
        "SentencePiece model of the tiny base tokenizer (`python -m dapt base-tokenizer`)",
    )
    general_data: Path = param(
        DEFAULT_GENERAL_DATA, "folder of general-text JSONL to pretrain the tiny model on"
    )
    llama2c_checkpoint: Path | None = param(None, "convert this llama2.c .bin checkpoint instead of training")
    llama2c_tokenizer: Path | None = param(None, "the llama2.c checkpoint's SentencePiece .model file")
    hidden_size: int = param(192, "tiny model: hidden size")
    intermediate_size: int = param(512, "tiny model: MLP inner size")
    num_layers: int = param(4, "tiny model: transformer layers")
    num_heads: int = param(6, "tiny model: attention heads")
    num_kv_heads: int = param(2, "tiny model: key/value heads (grouped-query attention)")
    max_position_embeddings: int = param(512, "tiny model: maximum sequence length")
    tie_embeddings: bool = param(False, "tiny model: share input and output embeddings (Llama 2 does not)")
    seq_length: int = param(256, "pretraining sequence length")
    batch_size: int = param(8, "pretraining sequences per step")
    steps: int = param(240, "pretraining optimizer steps")
    learning_rate: float = param(3e-3, "peak learning rate (AdamW, linear warmup, cosine decay)")
    warmup_steps: int = param(15, "learning-rate warmup steps")
    seed: int = param(0, "seed for initialisation and data order")
    threads: int = param(2, "torch CPU threads (fixed so runs are reproducible)")


# --- shared helpers -----------------------------------------------------------------------------


def lossless_sentencepiece(model_path: Path) -> bytes:
    """SentencePiece model with ``remove_extra_whitespaces`` off: encoding loses no spaces."""
    from dapt.compat import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = False
    return proto.SerializeToString()


def _check_sentencepiece(path: Path, flag: str, hint: str) -> Any:
    """The SentencePiece model at ``path`` (given as ``flag``); a missing or foreign file says ``hint``."""
    import sentencepiece as spm

    if not Path(path).is_file():
        raise UserInputError(f"{flag} {path} does not exist; {hint}.")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise UserInputError(f"{flag} {path} is not a SentencePiece model ({error}); {hint}.") from None


def _write_generation_config(folder: Path, sp: Any, max_length: int) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), max_length=max_length
    ).save_pretrained(str(folder))


# --- llama2.c conversion ------------------------------------------------------------------------

LLAMA2C_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def read_llama2c(path: Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Read a llama2.c checkpoint (legacy version-0 format): header of 7 int32, then float32 weights.

    Returns the header (``vocab_size`` made positive, ``shared_classifier`` added) and the raw weights in
    llama2.c's layout (per-layer stacks, query/key rows still in llama2.c's interleaved rotary order).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"--llama2c-checkpoint {path} does not exist; pass a llama2.c .bin checkpoint "
            "(for example stories260K.bin)."
        )
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size < 28:
        raise UserInputError(
            f"--llama2c-checkpoint {path} is too short ({raw.size} bytes) to hold its 28-byte header; "
            "pass a llama2.c .bin checkpoint."
        )
    header = dict(zip(LLAMA2C_HEADER, (int(v) for v in raw[:28].view(np.int32)), strict=True))
    header["shared_classifier"] = int(header["vocab_size"] > 0)
    header["vocab_size"] = abs(header["vocab_size"])
    dim, hidden, layers = header["dim"], header["hidden_dim"], header["n_layers"]
    heads, kv_heads, vocab, seq = (
        header["n_heads"],
        header["n_kv_heads"],
        header["vocab_size"],
        header["seq_len"],
    )
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq) <= 0 or dim % heads or heads % kv_heads:
        raise UserInputError(
            f"--llama2c-checkpoint {path} has an implausible header {header}; is it a llama2.c .bin file?"
        )
    head = dim // heads
    shapes = [
        ("tok_embeddings", (vocab, dim)),
        ("attention_norm", (layers, dim)),
        ("wq", (layers, heads * head, dim)),
        ("wk", (layers, kv_heads * head, dim)),
        ("wv", (layers, kv_heads * head, dim)),
        ("wo", (layers, dim, heads * head)),
        ("ffn_norm", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("norm", (dim,)),
        ("freq_cis", (2, seq, head // 2)),  # precomputed rotary tables, unused
    ]
    if not header["shared_classifier"]:
        shapes.append(("output", (vocab, dim)))
    floats = raw[28:].view(np.float32) if (raw.size - 28) % 4 == 0 else None
    needed = sum(math.prod(shape) for _, shape in shapes)
    if floats is None or floats.size != needed:
        got = (raw.size - 28) / 4
        raise UserInputError(
            f"--llama2c-checkpoint {path}: header {header} needs {needed} float32 weights, "
            f"the file holds {got}; "
            "is it a version-0 (legacy) llama2.c export?"
        )
    weights, offset = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        weights[name] = floats[offset : offset + size].reshape(shape)
        offset += size
    return header, weights


def rotary_rows_to_hf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder query/key rows from llama2.c's interleaved rotary pairs to HF Llama's half-split layout."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def llama2c_to_hf(header: dict[str, int], weights: dict[str, np.ndarray]) -> Any:
    """An HF ``LlamaForCausalLM`` holding the llama2.c weights (tied when llama2.c shares the classifier)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header["vocab_size"],
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"],
        num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"],
        max_position_embeddings=header["seq_len"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=bool(header["shared_classifier"]),
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )  # no dtype: save_pretrained records the weights' own (float32), as "torch_dtype" or "dtype"
    state = {"model.embed_tokens.weight": weights["tok_embeddings"], "model.norm.weight": weights["norm"]}
    state["lm_head.weight"] = weights["tok_embeddings"] if header["shared_classifier"] else weights["output"]
    for i in range(header["n_layers"]):
        prefix = f"model.layers.{i}."
        state[prefix + "self_attn.q_proj.weight"] = rotary_rows_to_hf(weights["wq"][i], header["n_heads"])
        state[prefix + "self_attn.k_proj.weight"] = rotary_rows_to_hf(weights["wk"][i], header["n_kv_heads"])
        state[prefix + "self_attn.v_proj.weight"] = weights["wv"][i]
        state[prefix + "self_attn.o_proj.weight"] = weights["wo"][i]
        state[prefix + "mlp.gate_proj.weight"] = weights["w1"][i]
        state[prefix + "mlp.down_proj.weight"] = weights["w2"][i]
        state[prefix + "mlp.up_proj.weight"] = weights["w3"][i]
        state[prefix + "input_layernorm.weight"] = weights["attention_norm"][i]
        state[prefix + "post_attention_layernorm.weight"] = weights["ffn_norm"][i]
    model = LlamaForCausalLM(config)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"llama2.c conversion left weights unset {missing} or unused {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert_llama2c(config: BaseModelConfig) -> Path:
    """Convert a llama2.c checkpoint and its tokenizer (saved lossless) into an HF folder."""
    from dapt.tokenizer import write_hf_tokenizer

    if config.llama2c_tokenizer is None:
        raise UserInputError(
            f"--llama2c-checkpoint {config.llama2c_checkpoint} needs --llama2c-tokenizer (the SentencePiece "
            ".model file it was trained with, for example tok512.model)."
        )
    sp = _check_sentencepiece(
        config.llama2c_tokenizer, "--llama2c-tokenizer", "pass the checkpoint's SentencePiece .model file"
    )
    header, weights = read_llama2c(config.llama2c_checkpoint)
    if sp.get_piece_size() != header["vocab_size"]:
        raise UserInputError(
            f"llama2.c tokenizer {config.llama2c_tokenizer} has {sp.get_piece_size()} pieces but checkpoint "
            f"{config.llama2c_checkpoint} has a vocabulary of {header['vocab_size']}; "
            "pass the matching tokenizer."
        )
    model = llama2c_to_hf(header, weights)
    inputs = {
        "llama2c_checkpoint": {
            "path": str(config.llama2c_checkpoint),
            "sha256": file_sha256(config.llama2c_checkpoint),
        },
        "llama2c_tokenizer": {
            "path": str(config.llama2c_tokenizer),
            "sha256": file_sha256(config.llama2c_tokenizer),
        },
    }
    with stage_output(config.output, STAGE, _manifest_parameters(config), inputs) as folder:
        model.save_pretrained(str(folder), safe_serialization=True)
        (folder / "tokenizer.model").write_bytes(lossless_sentencepiece(config.llama2c_tokenizer))
        write_hf_tokenizer(folder)
        _write_generation_config(folder, sp, header["seq_len"])
        write_json(
            folder / "report.json",
            {
                "mode": "llama2c",
                "header": header,
                "parameters": sum(p.numel() for p in model.parameters()),
                "tokenizer": "lossless copy (remove_extra_whitespaces=false)",
            },
        )
    print(f"converted {config.llama2c_checkpoint} -> {config.output} ({header})")
    return Path(config.output)


# --- tiny model pretraining ---------------------------------------------------------------------


def _manifest_parameters(config: BaseModelConfig) -> dict:
    params = jsonable(config)
    params.pop("output")
    params["format_version"] = FORMAT_VERSION
    if config.llama2c_checkpoint is not None:  # training parameters do not apply to a conversion
        params = {k: params[k] for k in ("llama2c_checkpoint", "llama2c_tokenizer", "format_version")}
    return params


def _tiny_inputs(config: BaseModelConfig) -> dict:
    from dapt.corpus import find_jsonl_files

    root = Path(config.general_data)
    files = find_jsonl_files(root)
    names = [str(f.relative_to(root)) if root.is_dir() else f.name for f in files]
    return {
        "tokenizer": {"path": str(config.tokenizer), "sha256": file_sha256(config.tokenizer)},
        "general_data": {
            "path": str(config.general_data),
            "files": {n: file_sha256(f) for n, f in zip(names, files, strict=True)},
        },
    }


def _cached(config: BaseModelConfig, inputs: dict) -> bool:
    manifest = read_manifest(config.output)
    return bool(
        manifest
        and manifest.get("stage") == STAGE
        and manifest.get("parameters") == jsonable(_manifest_parameters(config))
        and manifest.get("inputs") == jsonable(inputs)
        and (Path(config.output) / "model.safetensors").is_file()
    )


def validate_tiny(config: BaseModelConfig) -> None:
    """Refuse tiny-model parameters that cannot work, naming the user's value."""
    positive = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "seq_length",
                "batch_size", "steps", "threads")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} {getattr(config, name)} must be at least 1.")
    if config.max_position_embeddings < 2:
        raise UserInputError(
            f"--max-position-embeddings {config.max_position_embeddings} must be at least 2."
        )
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise UserInputError(f"--learning-rate {config.learning_rate} must be a positive number.")
    if config.warmup_steps < 0:
        raise UserInputError(f"--warmup-steps {config.warmup_steps} must be 0 or more.")
    if not 0 <= config.seed <= MAX_SEED:
        raise UserInputError(f"--seed {config.seed} must be from 0 to {MAX_SEED}.")
    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise UserInputError(
            f"--hidden-size {config.hidden_size} must be a multiple of --num-heads {config.num_heads}, "
            f"which must be a multiple of --num-kv-heads {config.num_kv_heads}."
        )
    if (config.hidden_size // config.num_heads) % 2:
        raise UserInputError(
            f"--hidden-size {config.hidden_size} / --num-heads {config.num_heads} gives heads of "
            f"{config.hidden_size // config.num_heads} dimensions; rotary embeddings need an even number."
        )
    if config.seq_length > config.max_position_embeddings:
        raise UserInputError(
            f"--seq-length {config.seq_length} exceeds --max-position-embeddings "
            f"{config.max_position_embeddings}."
        )


def _token_stream(config: BaseModelConfig, sp: Any) -> np.ndarray:
    """All general documents as one stream of token ids: [BOS] + tokens + [EOS] per document."""
    from dapt.corpus import load_corpus

    corpus = load_corpus(config.general_data, "general")
    ids: list[int] = []
    for doc in corpus.documents:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(doc.text))
        ids.append(sp.eos_id())
    return np.asarray(ids, dtype=np.int64)


def _tiny_model(config: BaseModelConfig, vocab_size: int, sp: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=0.02,
        bos_token_id=sp.bos_id(),
        eos_token_id=sp.eos_id(),
        attn_implementation="sdpa",
    )  # no dtype: save_pretrained records the weights' own (float32), as "torch_dtype" or "dtype"
    return LlamaForCausalLM(llama_config)


def _pretrain(model: Any, stream: np.ndarray, config: BaseModelConfig) -> list[float]:
    """A short AdamW run on random windows of the token stream; returns the loss per step."""
    import torch
    from tqdm.auto import tqdm

    windows = (len(stream) - 1) // config.seq_length
    if windows < config.batch_size:
        raise UserInputError(
            f"general data {config.general_data} gives only {len(stream)} tokens, too few for batches of "
            f"{config.batch_size} x {config.seq_length}; add data or lower --seq-length/--batch-size."
        )
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
    )

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    model.train()
    order = rng.permutation(windows)
    for step in tqdm(range(config.steps), desc="pretraining tiny base model", unit=" steps"):
        picks = [order[(step * config.batch_size + j) % windows] for j in range(config.batch_size)]
        batch = torch.from_numpy(
            np.stack([stream[p * config.seq_length : (p + 1) * config.seq_length + 1] for p in picks])
        )
        loss = _next_token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _next_token_loss(model: Any, batch: Any) -> Any:
    import torch

    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def train_tiny_model(config: BaseModelConfig) -> Path:
    """Pretrain the miniature Llama on the general sample (cached by parameters and input hashes)."""
    import torch

    from dapt.tokenizer import write_hf_tokenizer

    validate_tiny(config)
    sp = _check_sentencepiece(
        config.tokenizer,
        "--tokenizer",
        "pass the base SentencePiece model (`python -m dapt base-tokenizer` writes the tiny one to "
        "outputs/tiny/base_tokenizer/tokenizer.model)",
    )
    if not Path(config.general_data).exists():
        raise UserInputError(
            f"--general-data {config.general_data} does not exist; pass a JSONL file or folder of general "
            "text (`python -m dapt sample-data` writes the embedded sample to code/general_data)."
        )
    inputs = _tiny_inputs(config)
    if _cached(config, inputs):
        print(f"base model {config.output} is up to date (same parameters and inputs); reusing it.")
        return Path(config.output)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        stream = _token_stream(config, sp)
        model = _tiny_model(config, sp.get_piece_size(), sp)
        start = time.perf_counter()
        losses = _pretrain(model, stream, config)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    model.eval()
    report = {
        "mode": "tiny",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": config.tie_embeddings,
        "general_tokens": int(len(stream)),
        "tokens_seen": config.steps * config.batch_size * config.seq_length,
        "train_seconds": round(seconds, 1),
        "loss_first": round(losses[0], 4),
        "loss_last10": round(float(np.mean(losses[-10:])), 4),
        "losses": [round(v, 4) for v in losses],
    }
    with stage_output(config.output, STAGE, _manifest_parameters(config), inputs) as folder:
        model.save_pretrained(str(folder), safe_serialization=True)
        (folder / "tokenizer.model").write_bytes(Path(config.tokenizer).read_bytes())
        write_hf_tokenizer(folder)
        _write_generation_config(folder, sp, config.max_position_embeddings)
        write_json(folder / "report.json", report)
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}))
    return Path(config.output)


def build_base_model(config: BaseModelConfig) -> Path:
    """Stage entry: convert a llama2.c checkpoint when one is given, else build the tiny pretrained model."""
    if config.llama2c_checkpoint is not None:
        return convert_llama2c(config)
    if config.llama2c_tokenizer is not None:
        raise StageError(
            f"--llama2c-tokenizer {config.llama2c_tokenizer} is only used with --llama2c-checkpoint; pass the "
            "checkpoint too, or drop --llama2c-tokenizer to build the tiny model."
        )
    return train_tiny_model(config)
