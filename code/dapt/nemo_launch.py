"""Stage ``launch``: HF -> ``.nemo`` conversion and NeMo continued pretraining, for the NeMo 24.07 container.

From a typed profile this stage builds, checks and (inside the container, on GPUs) runs:

(a) ``convert_llama_hf_to_nemo.py`` on the extended HF checkpoint (its ``tokenizer.model``,
    the adapted one, is packed into the ``.nemo``);
(b) ``megatron_gpt_pretraining.py`` restoring that ``.nemo`` with the adapted tokenizer, the
    domain + replay data blend, TP/PP, sequence length, batch sizes, bf16, ChipNeMo's optimiser
    settings, checkpointing with resume, and ``save_nemo_on_train_end`` so the trained model lands
    at ``RUN_DIR/checkpoints/<name>.nemo``;
(c) ``torchrun`` on one node, or a generated Slurm ``sbatch`` script (one task per GPU) for several.

Every script argument and Hydra key is taken from NeMo's sources at tag ``r2.0.0rc1`` (the NeMo
line in the 24.07 container); the source file is named next to each. Nothing is guessed:
``++key=value`` (add or override) is used for keys that are read by NeMo's code but absent from
the example YAML, so the command works whether or not the YAML lists them.

Without NeMo or without enough GPUs the stage prints the commands and says why it does not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.artifacts import file_sha256, stage_output
from dapt.config import DEFAULT_OUTPUTS, Profile, get_profile, param
from dapt.errors import UserInputError
from dapt.megatron_data import (
    SPLITS,
    build_blend,
    check_data_matches_tokenizer,
    load_sentencepiece,
    tokenizer_model_path,
)

CONTAINER_IMAGE = "nvcr.io/nvidia/nemo:24.07"
# Paths inside the container (NeMo r2.0.0rc1 checkout at /opt/NeMo).
CONVERT_SCRIPT = "scripts/checkpoint_converters/convert_llama_hf_to_nemo.py"
PRETRAIN_SCRIPT = "examples/nlp/language_modeling/megatron_gpt_pretraining.py"
CONF_DIR = "examples/nlp/language_modeling/conf"
CONF_NAME = "megatron_llama_config"
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP (128 is NeMo's value).
VOCAB_MULTIPLE = 128
# Known NaN/hang workaround on NVSwitch (NVLS) systems, suggested in the tutorial's issue threads:
# NCCL's NVLink SHARP collectives are disabled for the training processes.
LAUNCH_ENV = {"NCCL_NVLS_ENABLE": "0"}

# Llama 2 architectures (config.json of meta-llama/Llama-2-{7b,13b,70b}-hf); used for sizing.
LLAMA2_ARCH = {
    "7b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "13b": {
        "hidden_size": 5120,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "intermediate_size": 13824,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
    "70b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 28672,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    },
}


@dataclass
class LaunchConfig:
    """Convert the extended checkpoint to .nemo and run NeMo continued pretraining (NeMo 24.07 container)."""

    profile: str = param("llama2-7b", "hardware/model profile (see dapt.config.PROFILES)")
    hf_model: Path | None = param(
        None, "extended HF checkpoint folder; None: outputs/<profile>/extended_model"
    )
    tokenizer: Path | None = param(None, "adapted tokenizer folder; None: outputs/<profile>/tokenizer")
    domain_data: Path | None = param(
        None, "domain data prefix; None: outputs/<profile>/megatron_data/domain"
    )
    general_data: Path | None = param(
        None, "general data prefix; None: outputs/<profile>/megatron_data/general"
    )
    general_share: float | None = param(None, "replay share of general data; None: the profile's")
    output: Path | None = param(
        None, "folder for the commands, sbatch script and plan (outputs/<profile>/launch)"
    )
    run_dir: Path | None = param(
        None, "NeMo run folder: .nemo files, checkpoints, logs (outputs/<profile>/nemo_run)"
    )
    run_name: str = param("dapt", "exp_manager name; the trained model is RUN_DIR/checkpoints/<name>.nemo")
    max_steps: int | None = param(None, "training steps; None: the profile's")
    warmup_steps: int | None = param(None, "linear warmup steps, below max_steps; None: the profile's")
    val_check_interval: int | None = param(None, "validate every N steps, at most max_steps (profile's)")
    global_batch_size: int | None = param(None, "sequences per optimizer step; None: the profile's")
    micro_batch_size: int | None = param(None, "sequences per GPU per micro step; None: the profile's")
    seed: int = param(1234, "model.seed")
    nemo_dir: str = param("/opt/NeMo", "NeMo checkout inside the container")
    container_image: str = param(
        CONTAINER_IMAGE, "container for the Slurm script (pyxis); empty: no container"
    )
    slurm_partition: str = param("", "Slurm partition (empty: the cluster's default)")
    slurm_account: str = param("", "Slurm account (empty: none)")
    slurm_time: str = param("04:00:00", "Slurm time limit; resume continues from the last checkpoint")
    dry_run: bool = param(False, "only check the inputs, print and write the commands")


@dataclass
class Check:
    """One validation before launch."""

    name: str
    ok: bool
    detail: str


# --- inputs -----------------------------------------------------------------------------------------------


def _resolved(config: LaunchConfig, profile: Profile) -> dict[str, Any]:
    root = DEFAULT_OUTPUTS / profile.name
    share = profile.general_share if config.general_share is None else config.general_share
    return {
        "hf_model": Path(config.hf_model or root / "extended_model").absolute(),
        "tokenizer": Path(config.tokenizer or root / "tokenizer").absolute(),
        "domain_data": Path(config.domain_data or root / "megatron_data" / "domain").absolute(),
        "general_data": Path(config.general_data or root / "megatron_data" / "general").absolute(),
        "general_share": share,
        "output": Path(config.output or root / "launch").absolute(),
        "run_dir": Path(config.run_dir or root / "nemo_run").absolute(),
        "max_steps": config.max_steps or profile.max_steps,
        "warmup_steps": profile.warmup_steps if config.warmup_steps is None else config.warmup_steps,
        "val_check_interval": config.val_check_interval or profile.val_check_interval,
        "global_batch_size": config.global_batch_size or profile.global_batch_size,
        "micro_batch_size": config.micro_batch_size or profile.micro_batch_size,
    }


def read_hf_config(hf_model: Path) -> dict[str, Any]:
    """The extended checkpoint's ``config.json``."""
    path = hf_model / "config.json"
    if not path.is_file():
        raise UserInputError(
            f"hf-model: {path} does not exist; run `python -m dapt embeddings` or point to it."
        )
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


# --- checks -----------------------------------------------------------------------------------------------


def check_parallel_layout(profile: Profile, arch: dict[str, Any], hp: dict[str, Any]) -> list[Check]:
    """GPU grid, batch sizes, schedule and sequence length against the model and each other."""
    tp, pp, world = profile.tensor_parallel, profile.pipeline_parallel, profile.world_size
    checks = []
    model_parallel = tp * pp
    grid_ok = world > 0 and world % model_parallel == 0
    checks.append(
        Check(
            "gpu grid",
            grid_ok,
            f"{world} GPUs ({profile.num_nodes} node(s) x {profile.gpus_per_node}) must be a multiple of "
            f"TP x PP = {tp} x {pp}",
        )
    )
    dp = world // model_parallel if grid_ok else 0
    gbs, mbs = hp["global_batch_size"], hp["micro_batch_size"]
    checks.append(
        Check(
            "batch sizes",
            dp > 0 and mbs > 0 and gbs % (mbs * max(dp, 1)) == 0,
            f"global batch {gbs} must be divisible by micro batch {mbs} x data parallel {dp}",
        )
    )
    heads, layers = arch["num_attention_heads"], arch["num_hidden_layers"]
    kv_heads = arch.get("num_key_value_heads", heads)
    checks.append(
        Check(
            "heads per TP rank",
            heads % tp == 0 and kv_heads % tp == 0,
            f"{heads} attention heads and {kv_heads} KV heads must divide by TP {tp}",
        )
    )
    checks.append(Check("layers per PP stage", layers % pp == 0, f"{layers} layers must divide by PP {pp}"))
    checks.append(
        Check(
            "warmup",
            0 <= hp["warmup_steps"] < hp["max_steps"],
            f"warmup {hp['warmup_steps']} steps must be below max_steps {hp['max_steps']} "
            "(otherwise the learning rate never reaches its value)",
        )
    )
    checks.append(
        Check(
            "validation interval",
            0 < hp["val_check_interval"] <= hp["max_steps"],
            f"val_check_interval {hp['val_check_interval']} must be within max_steps {hp['max_steps']}",
        )
    )
    max_pos = arch.get("max_position_embeddings", profile.seq_length)
    checks.append(
        Check(
            "sequence length",
            profile.seq_length <= max_pos,
            f"seq_length {profile.seq_length} must be at most max_position_embeddings {max_pos}",
        )
    )
    return checks


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


def _file_checks(paths: dict[str, Any], share: float) -> tuple[list[Check], dict[str, Any]]:
    checks, found = [], {}
    hf = paths["hf_model"]
    weights = sorted(hf.glob("*.safetensors")) + sorted(hf.glob("pytorch_model*.bin")) if hf.is_dir() else []
    checks.append(
        Check(
            "HF checkpoint present",
            (hf / "config.json").is_file() and bool(weights),
            f"{hf} must hold config.json and weights (*.safetensors)",
        )
    )
    checks.append(
        Check(
            "HF tokenizer.model present",
            (hf / "tokenizer.model").is_file(),
            f"{hf / 'tokenizer.model'} is what the converter packs into the .nemo",
        )
    )
    try:
        found["tokenizer_model"] = tokenizer_model_path(paths["tokenizer"])
        checks.append(Check("adapted tokenizer present", True, str(found["tokenizer_model"])))
    except UserInputError as error:
        checks.append(Check("adapted tokenizer present", False, str(error)))
    prefixes = {"domain": paths["domain_data"]}
    if share > 0:
        prefixes["general"] = paths["general_data"]
    found["data_records"] = {}
    for name, prefix in prefixes.items():
        if "tokenizer_model" not in found:
            break
        try:
            record = check_data_matches_tokenizer(prefix, paths["tokenizer"])
            found["data_records"][name] = record
            empty = [split for split in SPLITS if record["splits"][split]["documents"] == 0]
            checks.append(
                Check(
                    f"{name} data built with this tokenizer",
                    not empty,
                    f"{prefix}: tokenizer sha256 matches"
                    + (
                        f"; but split(s) {empty} are empty: NeMo needs documents in every split, "
                        "rebuild with --split-percent giving each a share"
                        if empty
                        else ""
                    ),
                )
            )
        except UserInputError as error:
            checks.append(Check(f"{name} data built with this tokenizer", False, str(error)))
    return checks, found


def run_checks(
    config: LaunchConfig, profile: Profile, paths: dict[str, Any]
) -> tuple[list[Check], dict[str, Any]]:
    """Every check possible before launch; the architecture comes from the checkpoint's config.json."""
    checks, found = _file_checks(paths, paths["general_share"])
    hf = paths["hf_model"]
    arch = dict(LLAMA2_ARCH.get(profile.model_size, LLAMA2_ARCH["7b"]))
    if (hf / "config.json").is_file():
        arch = read_hf_config(hf)
    found["arch"] = arch
    checks += check_parallel_layout(profile, arch, paths)
    if "tokenizer_model" in found:
        sp = load_sentencepiece(found["tokenizer_model"])
        vocab = sp.get_piece_size()
        found["vocab_size"] = vocab
        checks.append(check_vocab(vocab, profile.tensor_parallel))
        if (hf / "config.json").is_file():
            checks.append(
                Check(
                    "tokenizer size = checkpoint vocab",
                    arch.get("vocab_size") == vocab,
                    f"tokenizer has {vocab} pieces, {hf / 'config.json'} vocab_size is "
                    f"{arch.get('vocab_size')}",
                )
            )
            rows = checkpoint_vocab_rows(hf) if any(hf.glob("*.safetensors")) else {}
            if rows:
                checks.append(
                    Check(
                        "tokenizer size = embedding rows",
                        set(rows.values()) == {vocab},
                        f"tokenizer has {vocab} pieces; checkpoint rows: {rows}",
                    )
                )
        if (hf / "tokenizer.model").is_file():
            same = file_sha256(hf / "tokenizer.model") == file_sha256(found["tokenizer_model"])
            checks.append(
                Check(
                    "HF folder holds the adapted tokenizer",
                    same,
                    f"{hf / 'tokenizer.model'} must equal {found['tokenizer_model']} (the converter "
                    "packs the HF folder's tokenizer into the .nemo)",
                )
            )
    return checks, found


# --- commands ---------------------------------------------------------------------------------------------


def _hydra_str(value: str) -> str:
    """A Hydra override string value, quoted so that paths with any character stay one value."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _hydra_list(items: list[str]) -> str:
    parts = [item if _is_number(item) else _hydra_str(item) for item in items]
    return "[" + ",".join(parts) + "]"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def hydra_data_prefix(blend: dict[str, list[str]]) -> str:
    """``{train:[w,'path',...],validation:[...],test:[...]}`` for ``model.data.data_prefix``."""
    return "{" + ",".join(f"{split}:{_hydra_list(blend[split])}" for split in SPLITS) + "}"


def _tokenizer_file(tokenizer: Path) -> Path:
    return tokenizer / "tokenizer.model" if tokenizer.is_dir() or not tokenizer.suffix else tokenizer


def nemo_paths(paths: dict[str, Any], run_name: str) -> dict[str, Path]:
    """Where the converted and the trained ``.nemo`` files go."""
    run_dir = paths["run_dir"]
    return {
        "converted": run_dir / "extended_model.nemo",
        "converting": run_dir / ".converting" / "extended_model.nemo",
        # C: NeMoModelCheckpoint._format_nemo_checkpoint_name: log_dir/checkpoints/<name>.nemo
        "trained": run_dir / "checkpoints" / f"{run_name}.nemo",
    }


def convert_command(nemo_dir: str, hf_model: Path, output: Path) -> list[str]:
    """HF -> .nemo with NeMo's converter (args: scripts/checkpoint_converters/convert_llama_hf_to_nemo.py)."""
    return [
        "python",
        f"{nemo_dir}/{CONVERT_SCRIPT}",
        "--input_name_or_path",
        str(hf_model),  # convert_llama_hf_to_nemo.py get_args()
        "--output_path",
        str(output),  # convert_llama_hf_to_nemo.py get_args()
        "--precision",
        "bf16",  # convert_llama_hf_to_nemo.py get_args(): weights saved in bf16
    ]


def pretrain_overrides(
    config: LaunchConfig,
    profile: Profile,
    paths: dict[str, Any],
    arch: dict[str, Any],
    blend: dict[str, list[str]],
) -> list[str]:
    """Hydra overrides for megatron_gpt_pretraining.py with conf/megatron_llama_config.yaml.

    Sources at r2.0.0rc1: Y = examples/nlp/language_modeling/conf/megatron_llama_config.yaml,
    P = examples/nlp/language_modeling/megatron_gpt_pretraining.py,
    M = nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py,
    B = nemo/collections/nlp/parts/megatron_trainer_builder.py, E = nemo/utils/exp_manager.py,
    C = nemo/utils/callbacks/nemo_model_checkpoint.py, S = nemo/core/optim/lr_scheduler.py.
    With ``restore_from_path`` set, P restores the .nemo with ``cfg.model`` as the model config
    (``override_config_path``), so the architecture is set here from the checkpoint's config.json.
    """
    nemo = nemo_paths(paths, config.run_name)
    heads = arch["num_attention_heads"]
    lr = profile.learning_rate
    return [
        # trainer (Y: trainer.*; B builds the PTL Trainer and its bf16 precision plugin)
        f"trainer.devices={profile.gpus_per_node}",
        f"trainer.num_nodes={profile.num_nodes}",
        f"trainer.precision={profile.precision}",  # B: accepts 16, bf16, 16-mixed, bf16-mixed
        f"trainer.max_steps={paths['max_steps']}",
        f"trainer.val_check_interval={paths['val_check_interval']}",
        # parallelism and batch (Y: model.*; M: gradient accumulation = global / (micro x data parallel))
        f"model.tensor_model_parallel_size={profile.tensor_parallel}",
        f"model.pipeline_model_parallel_size={profile.pipeline_parallel}",
        f"model.sequence_parallel={profile.tensor_parallel > 1}",  # Y: model.sequence_parallel
        f"model.micro_batch_size={paths['micro_batch_size']}",
        f"model.global_batch_size={paths['global_batch_size']}",
        "model.megatron_amp_O2=True",  # Y: bf16 weights with fp32 main params in the optimizer
        f"model.seed={config.seed}",  # Y: model.seed
        # architecture from the checkpoint's config.json (Y keys; the converter sets the same ones)
        f"model.encoder_seq_length={profile.seq_length}",  # Y; model.data.seq_length interpolates it
        f"model.max_position_embeddings={arch.get('max_position_embeddings', profile.seq_length)}",
        f"model.num_layers={arch['num_hidden_layers']}",
        f"model.hidden_size={arch['hidden_size']}",
        f"model.ffn_hidden_size={arch['intermediate_size']}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={arch.get('num_key_value_heads', heads)}",
        f"model.init_method_std={arch.get('initializer_range', 0.02)}",
        f"model.layernorm_epsilon={arch.get('rms_norm_eps', 1e-5)}",
        # rotary_base: read by M (cfg.get('rotary_base')), set by the converter, absent from Y -> '++'
        f"++model.rotary_base={float(arch.get('rope_theta') or 10000.0)}",
        # no padding rows: the vocab is already a multiple of 128 x TP (checked before launch)
        f"model.make_vocab_size_divisible_by={VOCAB_MULTIPLE}",
        # the adapted tokenizer (Y: model.tokenizer.library / model.tokenizer.model)
        "model.tokenizer.library=sentencepiece",
        f"model.tokenizer.model={_hydra_str(str(_tokenizer_file(paths['tokenizer'])))}",
        # continued pretraining from the converted .nemo (P: cfg.model.get('restore_from_path'); not in Y)
        f"++model.restore_from_path={_hydra_str(str(nemo['converted']))}",
        # data blend, dict form train/validation/test (M: build_train_valid_test_datasets; commented out in Y)
        f"++model.data.data_prefix={hydra_data_prefix(blend)}",
        f"model.data.index_mapping_dir={_hydra_str(str(paths['run_dir'] / 'index_mapping'))}",  # Y
        # ChipNeMo optimiser: Adam (0.9, 0.95), weight decay 0.01, constant lr after linear warmup (Y: optim)
        f"model.optim.lr={lr}",
        f"model.optim.weight_decay={profile.weight_decay}",
        f"model.optim.betas=[{profile.adam_beta1},{profile.adam_beta2}]",
        # S: CosineAnnealing with min_lr == lr and constant_steps 0 is a linear warmup then exactly lr
        # ((lr - min_lr) * cos_term + min_lr = lr); its kwargs match Y's sched block, so no key is removed.
        "model.optim.sched.name=CosineAnnealing",
        f"model.optim.sched.warmup_steps={paths['warmup_steps']}",
        "++model.optim.sched.constant_steps=0",
        f"model.optim.sched.min_lr={lr}",
        # checkpointing and resume (Y: exp_manager.*; E: ExpManagerConfig / CallbackParams)
        f"exp_manager.explicit_log_dir={_hydra_str(str(paths['run_dir']))}",
        f"exp_manager.name={config.run_name}",
        "exp_manager.resume_if_exists=True",  # E: resumes from RUN_DIR/checkpoints/*last.ckpt
        "exp_manager.resume_ignore_no_checkpoint=True",  # E: the first run starts fresh
        "exp_manager.create_checkpoint_callback=True",
        "exp_manager.checkpoint_callback_params.always_save_nemo=False",
        # C: on_train_end saves RUN_DIR/checkpoints/<name>.nemo
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=True",
    ]


def pretrain_argv(config: LaunchConfig, overrides: list[str]) -> list[str]:
    """``megatron_gpt_pretraining.py`` with the Llama config (P: @hydra_runner config_path='conf')."""
    return [
        f"{config.nemo_dir}/{PRETRAIN_SCRIPT}",
        f"--config-path={config.nemo_dir}/{CONF_DIR}",
        f"--config-name={CONF_NAME}",
        *overrides,
    ]


def torchrun_command(profile: Profile, pretrain: list[str]) -> list[str]:
    """Single node: one process per GPU; Lightning reads the ranks torchrun sets."""
    return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={profile.gpus_per_node}", *pretrain]


def _bash_convert(convert: list[str], nemo: dict[str, Path]) -> str:
    """Convert once: into a temporary folder, then renamed, so a crash never leaves a half .nemo."""
    target, temp = nemo["converted"], nemo["converting"]
    return (
        f"if [ ! -f {shlex.quote(str(target))} ]; then\n"
        f"  mkdir -p {shlex.quote(str(temp.parent))}\n"
        f"  {shlex.join(convert)}\n"
        f"  mv {shlex.quote(str(temp))} {shlex.quote(str(target))}\n"
        "fi\n"
    )


def sbatch_script(
    config: LaunchConfig, profile: Profile, paths: dict[str, Any], convert: list[str], pretrain: list[str]
) -> str:
    """A Slurm batch script: convert on one task, then ``srun`` one task per GPU on every node."""
    nemo = nemo_paths(paths, config.run_name)
    mounts = sorted({str(p) for p in _mount_roots(paths)})
    container = ""
    if config.container_image:
        container = (
            f" --container-image={shlex.quote(config.container_image)}"
            f" --container-mounts={shlex.quote(','.join(f'{m}:{m}' for m in mounts))}"
        )
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name=dapt-{profile.name}",
        f"#SBATCH --nodes={profile.num_nodes}",
        f"#SBATCH --ntasks-per-node={profile.gpus_per_node}",
        f"#SBATCH --gpus-per-node={profile.gpus_per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={config.slurm_time}",
        f"#SBATCH --output={paths['run_dir']}/slurm-%j.out",
    ]
    if config.slurm_partition:
        header.append(f"#SBATCH --partition={config.slurm_partition}")
    if config.slurm_account:
        header.append(f"#SBATCH --account={config.slurm_account}")
    convert_script = _bash_convert(convert, nemo)
    return (
        "\n".join(header)
        + f"""
# Generated by `python -m dapt launch --profile {profile.name}`.
# Submit with: sbatch {paths["output"]}/dapt.sbatch
# Resubmitting after a time-out resumes from the last checkpoint (exp_manager.resume_if_exists=True).
set -euo pipefail
# NCCL NVLink SHARP off: known NaN/hang workaround on NVSwitch systems
export NCCL_NVLS_ENABLE=0
mkdir -p {shlex.quote(str(paths["run_dir"]))}

# (a) HF -> .nemo, once, on one task
srun --nodes=1 --ntasks=1{container} bash -c {shlex.quote(convert_script)}

# (b) continued pretraining: one task per GPU; PyTorch Lightning takes ranks from Slurm
srun{container} python {shlex.join(pretrain)}
"""
    )


def _mount_roots(paths: dict[str, Any]) -> list[Path]:
    roots = [paths["hf_model"], paths["tokenizer"], paths["domain_data"].parent, paths["run_dir"]]
    if paths["general_share"] > 0:
        roots.append(paths["general_data"].parent)
    return [Path(os.path.commonpath([str(r) for r in roots]))]


def commands_script(
    profile: Profile, paths: dict[str, Any], convert: list[str], train: list[str], run_name: str
) -> str:
    """The single-node commands as a bash script (what ``launch`` runs)."""
    nemo = nemo_paths(paths, run_name)
    return (
        "#!/bin/bash\n"
        f"# Generated by `python -m dapt launch --profile {profile.name}`; run inside {CONTAINER_IMAGE}.\n"
        "set -euo pipefail\n"
        "# NCCL NVLink SHARP off: known NaN/hang workaround on NVSwitch systems\n"
        "export NCCL_NVLS_ENABLE=0\n"
        f"mkdir -p {shlex.quote(str(paths['run_dir']))}\n"
        "# (a) HF -> .nemo (once)\n"
        f"{_bash_convert(convert, nemo)}"
        "# (b) continued pretraining; rerunning resumes from the last checkpoint\n"
        f"{shlex.join(train)}\n"
        f"# trained model: {nemo['trained']}\n"
    )


# --- sizing -----------------------------------------------------------------------------------------------


def parameter_count(arch: dict[str, Any], vocab_size: int) -> int:
    """Parameters of a Llama model (untied embeddings, RMSNorm, SwiGLU MLP, grouped-query attention)."""
    h, layers, ffn = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads", heads) * (h // heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * ffn + 2 * h
    return 2 * vocab_size * h + layers * per_layer + h


def estimate_memory_gb(
    arch: dict[str, Any], vocab_size: int, profile: Profile, micro_batch_size: int
) -> dict:
    """Rough per-GPU memory for bf16 O2 training with Adam (no distributed optimizer, no recomputation).

    Model states: 18 bytes/parameter (bf16 weight 2 + fp32 main weight 4 + fp32 grad 4 + Adam m, v 8),
    split over TP x PP. Activations: 34 x seq x micro_batch x hidden bytes per layer / TP with
    sequence parallelism and flash attention (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models"), layers/PP per stage, up to PP micro batches in flight
    (1F1B), plus fp32 logits and their gradient (8 x seq x micro_batch x vocab / TP bytes).
    """
    tp, pp = profile.tensor_parallel, profile.pipeline_parallel
    params = parameter_count(arch, vocab_size)
    states = params * 18 / (tp * pp)
    tokens = profile.seq_length * micro_batch_size
    layers_per_stage = arch["num_hidden_layers"] / pp
    activations = 34 * tokens * arch["hidden_size"] * layers_per_stage / tp * pp
    logits = 8 * tokens * vocab_size / tp
    total = states + activations + logits
    return {
        "parameters_billion": round(params / 1e9, 2),
        "model_states_gb": round(states / 1e9, 1),
        "activations_gb": round((activations + logits) / 1e9, 1),
        "total_gb": round(total / 1e9, 1),
        "fits": total / 1e9 < profile.gpu_memory_gb * 0.95,
    }


# --- the stage --------------------------------------------------------------------------------------------


def _environment_problems(config: LaunchConfig, profile: Profile) -> list[str]:
    problems = []
    if profile.num_nodes > 1:
        if shutil.which("sbatch") is None:
            problems.append(
                f"profile {profile.name} spans {profile.num_nodes} nodes: it needs Slurm "
                "(`sbatch` is not on PATH here)"
            )
        return problems
    try:
        import nemo.collections.nlp  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means no NeMo 1 NLP collection
        problems.append(
            f"NeMo's NLP collection is not importable ({type(error).__name__}: {error}); "
            f"run inside the NeMo 24.07 container ({CONTAINER_IMAGE})"
        )
    for script in (CONVERT_SCRIPT, PRETRAIN_SCRIPT):
        if not Path(config.nemo_dir, script).is_file():
            problems.append(
                f"{Path(config.nemo_dir, script)} does not exist (set --nemo-dir to NeMo's checkout)"
            )
    try:
        import torch

        available = torch.cuda.device_count()
    except ImportError:
        available = 0
    gpu = check_gpus(profile, available)
    if not gpu.ok:
        problems.append(gpu.detail)
    return problems


def build_plan(config: LaunchConfig) -> dict[str, Any]:
    """Resolve the profile, run every check and build the commands (nothing is run or written)."""
    try:
        profile = get_profile(config.profile)
    except ValueError as error:
        raise UserInputError(str(error)) from None
    if profile.gpus_per_node < 1:
        raise UserInputError(
            f"profile {profile.name} has no GPUs: NeMo training needs GPUs; use `dapt train`."
        )
    paths = _resolved(config, profile)
    checks, found = run_checks(config, profile, paths)
    share = paths["general_share"]
    blend = build_blend(paths["domain_data"], paths["general_data"] if share > 0 else None, share)
    overrides = pretrain_overrides(config, profile, paths, found["arch"], blend)
    nemo = nemo_paths(paths, config.run_name)
    convert = convert_command(config.nemo_dir, paths["hf_model"], nemo["converting"])
    pretrain = pretrain_argv(config, overrides)
    vocab = found.get("vocab_size", found["arch"].get("vocab_size", 32000))
    return {
        "profile": profile,
        "paths": paths,
        "checks": checks,
        "blend": blend,
        "convert": convert,
        "pretrain": pretrain,
        "torchrun": torchrun_command(profile, pretrain),
        "nemo": nemo,
        "sizing": estimate_memory_gb(found["arch"], vocab, profile, paths["micro_batch_size"]),
        "data_records": found.get("data_records", {}),
    }


def _print_plan(plan: dict[str, Any]) -> None:
    profile = plan["profile"]
    print(f"# profile {profile.name}: {profile.description}")
    for check in plan["checks"]:
        print(f"#   [{'ok' if check.ok else 'FAILED'}] {check.name}: {check.detail}")
    sizing = plan["sizing"]
    print(
        f"#   memory estimate per GPU: {sizing['total_gb']} GB of {profile.gpu_memory_gb} GB "
        f"({sizing['parameters_billion']}B parameters)"
    )
    print(f"export {' '.join(f'{k}={v}' for k, v in LAUNCH_ENV.items())}")
    print(shlex.join(plan["convert"]))
    if profile.num_nodes > 1:
        print(f"sbatch {plan['paths']['output'] / 'dapt.sbatch'}")
    else:
        print(shlex.join(plan["torchrun"]))
    print(f"# trained model: {plan['nemo']['trained']}")


def _write_plan(config: LaunchConfig, plan: dict[str, Any]) -> None:
    profile, paths = plan["profile"], plan["paths"]
    inputs = {
        name: {"prefix": str(paths[f"{name}_data"]), "tokenizer_sha256": record["tokenizer_sha256"]}
        for name, record in plan["data_records"].items()
    }
    with stage_output(paths["output"], "launch", config, inputs) as folder:
        (folder / "commands.sh").write_text(
            commands_script(profile, paths, plan["convert"], plan["torchrun"], config.run_name),
            encoding="utf-8",
        )
        (folder / "dapt.sbatch").write_text(
            sbatch_script(config, profile, paths, plan["convert"], plan["pretrain"]), encoding="utf-8"
        )
        (folder / "launch_plan.json").write_text(
            json.dumps(
                {
                    "profile": dataclasses.asdict(profile),
                    "env": LAUNCH_ENV,
                    "convert": plan["convert"],
                    "pretrain_torchrun": plan["torchrun"],
                    "blend": plan["blend"],
                    "converted_nemo": str(plan["nemo"]["converted"]),
                    "trained_nemo": str(plan["nemo"]["trained"]),
                    "checks": [dataclasses.asdict(c) for c in plan["checks"]],
                    "ready": all(c.ok for c in plan["checks"]),
                    "sizing": plan["sizing"],
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        for name in ("commands.sh", "dapt.sbatch"):
            (folder / name).chmod(0o755)


def launch(config: LaunchConfig) -> dict[str, Any]:
    """Check everything, write the commands; unless ``dry_run``, run them (needs NeMo and the GPUs).

    Raises :class:`UserInputError` when a check fails, and (not dry-run) when NeMo, the scripts,
    Slurm or the GPUs are missing: it then prints the commands and says why it does not run them.
    """
    plan = build_plan(config)
    _print_plan(plan)
    _write_plan(config, plan)
    print(f"# commands written to {plan['paths']['output']}")
    failed = [c for c in plan["checks"] if not c.ok]
    if failed:
        raise UserInputError(
            "not launching, these checks failed:\n  " + "\n  ".join(f"{c.name}: {c.detail}" for c in failed)
        )
    if config.dry_run:
        return plan
    problems = _environment_problems(config, plan["profile"])
    if problems:
        raise UserInputError("the commands above were not run:\n  " + "\n  ".join(problems))
    _run(plan)
    return plan


def _run(plan: dict[str, Any]) -> None:
    env = {**os.environ, **LAUNCH_ENV}
    paths, nemo = plan["paths"], plan["nemo"]
    paths["run_dir"].mkdir(parents=True, exist_ok=True)
    if plan["profile"].num_nodes > 1:
        subprocess.run(["sbatch", str(paths["output"] / "dapt.sbatch")], check=True, env=env)
        return
    if not nemo["converted"].is_file():
        nemo["converting"].parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(plan["convert"], check=True, env=env)
        os.replace(nemo["converting"], nemo["converted"])
    subprocess.run(plan["torchrun"], check=True, env=env)
    if not nemo["trained"].is_file():
        raise UserInputError(f"training ended without {nemo['trained']}; see the logs in {paths['run_dir']}.")
    print(f"trained model: {nemo['trained']}")
