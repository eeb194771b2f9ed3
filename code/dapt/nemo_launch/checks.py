"""Checks before launch: inputs present and consistent, GPU grid, batch sizes, schedule, vocabulary.

Each check returns a :class:`Check`; the stage refuses to write or run anything while one fails. Environment
checks (NeMo importable, scripts present, GPUs visible, ``sbatch`` on the PATH) are separate: a dry run does not
need them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.artifacts import file_sha256
from dapt.config import Profile
from dapt.errors import UserInputError
from dapt.megatron_data import SPLITS, check_data_matches_tokenizer, load_sentencepiece, tokenizer_model_path
from dapt.nemo_launch.commands import CONVERT_SCRIPT, PRETRAIN_SCRIPT, VOCAB_MULTIPLE
from dapt.nemo_launch.settings import CONTAINER_IMAGE, LaunchSettings
from dapt.nemo_launch.sizing import LLAMA2_ARCH


@dataclass
class Check:
    """One validation before launch."""

    name: str
    ok: bool
    detail: str


@dataclass
class Inputs:
    """What the checks read from the inputs, for the commands."""

    arch: dict[str, Any]
    arch_source: str  # the config.json read, or the stand-in shape used without one
    tokenizer_model: Path | None
    vocab_size: int | None
    data_records: dict[str, dict[str, Any]]


def read_hf_config(hf_model: Path) -> dict[str, Any]:
    """The extended checkpoint's ``config.json``."""
    path = hf_model / "config.json"
    if not path.is_file():
        raise UserInputError(f"--hf-model {hf_model}: {path} does not exist; run `python -m dapt embeddings`.")
    return json.loads(path.read_text(encoding="utf-8"))


def checkpoint_vocab_rows(hf_model: Path) -> dict[str, int]:
    """Rows of the input embedding and output layer, read from the safetensors headers only."""
    from safetensors import safe_open

    index = hf_model / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    else:
        weight_map = {name: "model.safetensors" for name in ("model.embed_tokens.weight", "lm_head.weight")}
    rows = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        shard = hf_model / weight_map.get(name, "model.safetensors")
        if not shard.is_file():
            continue
        with safe_open(str(shard), framework="numpy") as handle:
            if name in handle.keys():  # noqa: SIM118 - safe_open has keys(), no __contains__
                rows[name] = int(handle.get_slice(name).get_shape()[0])
    return rows


def check_parallel_layout(settings: LaunchSettings, arch: dict[str, Any]) -> list[Check]:
    """GPU grid, batch sizes, schedule and sequence length against the model and each other."""
    profile = settings.profile
    tp, pp, world = profile.tensor_parallel, profile.pipeline_parallel, profile.world_size
    model_parallel = tp * pp
    grid_ok = world > 0 and world % model_parallel == 0
    dp = world // model_parallel if grid_ok else 0
    gbs, mbs = settings.global_batch_size, settings.micro_batch_size
    heads, layers = arch["num_attention_heads"], arch["num_hidden_layers"]
    kv_heads = arch.get("num_key_value_heads", heads)
    max_pos = arch.get("max_position_embeddings", profile.seq_length)
    max_steps = settings.max_steps
    return [
        Check("gpu grid", grid_ok, f"{world} GPUs ({profile.num_nodes} node(s) x {profile.gpus_per_node}) must "
              f"be a multiple of TP x PP = {tp} x {pp}"),
        Check("batch sizes", dp > 0 and gbs % (mbs * max(dp, 1)) == 0,
              f"global batch {gbs} must be divisible by micro batch {mbs} x data parallel {dp}"),
        Check("heads per TP rank", heads % tp == 0 and kv_heads % tp == 0,
              f"{heads} attention heads and {kv_heads} KV heads must divide by TP {tp}"),
        Check("layers per PP stage", layers % pp == 0, f"{layers} layers must divide by PP {pp}"),
        Check("warmup", settings.warmup_steps < max_steps,
              f"warmup {settings.warmup_steps} steps must be below max_steps {max_steps} "
              "(otherwise the learning rate never reaches its value)"),
        Check("validation interval", settings.val_check_interval <= max_steps,
              f"val_check_interval {settings.val_check_interval} must be within max_steps {max_steps}"),
        Check("sequence length", profile.seq_length <= max_pos,
              f"seq_length {profile.seq_length} must be at most max_position_embeddings {max_pos}"),
    ]


def check_vocab(vocab_size: int, tensor_parallel: int) -> Check:
    """Megatron pads the vocab to a multiple of 128 x TP; a padded vocab no longer matches the checkpoint."""
    multiple = VOCAB_MULTIPLE * tensor_parallel
    return Check(
        "vocab multiple of 128 x TP",
        vocab_size % multiple == 0,
        f"tokenizer vocab {vocab_size} must be a multiple of {VOCAB_MULTIPLE} x TP {tensor_parallel} = "
        f"{multiple}; rebuild the tokenizer with a max TP of at least {tensor_parallel}",
    )


def check_gpus(profile: Profile, available: int) -> Check:
    """Enough local GPUs for a single-node launch (multi-node jobs are checked by Slurm and NeMo)."""
    needed = profile.gpus_per_node
    return Check(
        "GPUs",
        available >= needed,
        f"profile {profile.name} needs {needed} GPUs on this node, {available} visible "
        "(torch.cuda.device_count())",
    )


def _file_checks(settings: LaunchSettings) -> tuple[list[Check], Path | None, dict[str, dict[str, Any]]]:
    checks = []
    hf = settings.hf_model
    weights = sorted(hf.glob("*.safetensors")) + sorted(hf.glob("pytorch_model*.bin")) if hf.is_dir() else []
    checks.append(Check("HF checkpoint present", (hf / "config.json").is_file() and bool(weights),
                        f"--hf-model {hf} must hold config.json and weights (*.safetensors)"))
    checks.append(Check("HF tokenizer.model present", (hf / "tokenizer.model").is_file(),
                        f"{hf / 'tokenizer.model'} is what the converter packs into the .nemo"))
    tokenizer_model = None
    try:
        tokenizer_model = tokenizer_model_path(settings.tokenizer)
        checks.append(Check("adapted tokenizer present", True, str(tokenizer_model)))
    except UserInputError as error:
        checks.append(Check("adapted tokenizer present", False, str(error)))
    prefixes = {"domain": settings.domain_data}
    if settings.general_data is not None:
        prefixes["general"] = settings.general_data
    records: dict[str, dict[str, Any]] = {}
    for name, prefix in prefixes.items():
        if tokenizer_model is None:
            break
        try:
            record = check_data_matches_tokenizer(prefix, settings.tokenizer)
        except UserInputError as error:
            checks.append(Check(f"{name} data built with this tokenizer", False, str(error)))
            continue
        records[name] = record
        empty = [split for split in SPLITS if record["splits"][split]["documents"] == 0]
        detail = f"{prefix}: tokenizer sha256 matches"
        if empty:
            detail += (f"; but split(s) {empty} are empty: NeMo needs documents in every split, rebuild with "
                       "--split-percent giving each a share")
        checks.append(Check(f"{name} data built with this tokenizer", not empty, detail))
    return checks, tokenizer_model, records


def run_checks(settings: LaunchSettings) -> tuple[list[Check], Inputs]:
    """Every check possible before launch; the architecture comes from the checkpoint's config.json."""
    checks, tokenizer_model, records = _file_checks(settings)
    hf = settings.hf_model
    has_config = (hf / "config.json").is_file()
    size = settings.profile.model_size if settings.profile.model_size in LLAMA2_ARCH else "7b"
    arch = read_hf_config(hf) if has_config else dict(LLAMA2_ARCH[size])
    arch_source = str(hf / "config.json") if has_config else f"Llama-2-{size} shape ({hf} has no config.json)"
    checks += check_parallel_layout(settings, arch)
    vocab = None
    if tokenizer_model is not None:
        vocab = load_sentencepiece(tokenizer_model).get_piece_size()
        checks.append(check_vocab(vocab, settings.profile.tensor_parallel))
        if has_config:
            checks.append(Check("tokenizer size = checkpoint vocab", arch.get("vocab_size") == vocab,
                                f"tokenizer has {vocab} pieces, {hf / 'config.json'} vocab_size is "
                                f"{arch.get('vocab_size')}"))
            rows = checkpoint_vocab_rows(hf) if any(hf.glob("*.safetensors")) else {}
            if rows:
                checks.append(Check("tokenizer size = embedding rows", set(rows.values()) == {vocab},
                                    f"tokenizer has {vocab} pieces; checkpoint rows: {rows}"))
        if (hf / "tokenizer.model").is_file():
            same = file_sha256(hf / "tokenizer.model") == file_sha256(tokenizer_model)
            checks.append(Check("HF folder holds the adapted tokenizer", same,
                                f"{hf / 'tokenizer.model'} must equal {tokenizer_model} (the converter packs the "
                                "HF folder's tokenizer into the .nemo)"))
    return checks, Inputs(arch=arch, arch_source=arch_source, tokenizer_model=tokenizer_model, vocab_size=vocab,
                          data_records=records)


def environment_problems(settings: LaunchSettings) -> list[str]:
    """Why the commands cannot run here (not a dry run): no Slurm, no NeMo, no scripts, too few GPUs."""
    profile = settings.profile
    if profile.num_nodes > 1:
        if shutil.which("sbatch") is None:
            return [f"profile {profile.name} spans {profile.num_nodes} nodes: it needs Slurm "
                    "(`sbatch` is not on PATH here)"]
        return []
    problems = []
    try:
        import nemo.collections.nlp  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means no NeMo 1 NLP collection
        problems.append(f"NeMo's NLP collection is not importable ({type(error).__name__}: {error}); "
                        f"run inside the NeMo 24.07 container ({CONTAINER_IMAGE})")
    for script in (CONVERT_SCRIPT, PRETRAIN_SCRIPT):
        if not Path(settings.nemo_dir, script).is_file():
            problems.append(f"{Path(settings.nemo_dir, script)} does not exist (--nemo-dir {settings.nemo_dir} "
                            "must be NeMo's checkout)")
    try:
        import torch

        available = torch.cuda.device_count()
    except ImportError:
        available = 0
    gpu = check_gpus(profile, available)
    if not gpu.ok:
        problems.append(gpu.detail)
    return problems
