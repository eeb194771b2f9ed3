"""The NeMo command lines: HF -> ``.nemo`` conversion and ``megatron_gpt_pretraining.py`` with Hydra overrides.

Sources at tag r2.0.0rc1 (the NeMo of the 24.07 container), named next to each key:
Y = examples/nlp/language_modeling/conf/megatron_llama_config.yaml,
P = examples/nlp/language_modeling/megatron_gpt_pretraining.py,
M = nemo/collections/nlp/models/language_modeling/megatron_gpt_model.py,
B = nemo/collections/nlp/parts/megatron_trainer_builder.py, E = nemo/utils/exp_manager.py,
C = nemo/utils/callbacks/nemo_model_checkpoint.py, S = nemo/core/optim/lr_scheduler.py.

A key the YAML has is overridden as ``key=value`` (Hydra refuses a key the YAML lacks); a key NeMo's code reads
but the YAML lacks is added with ``++key=value``. ``tests/test_nemo_compose.py`` composes every generated command
with NeMo's own ``hydra_runner`` and checks both rules against the YAML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dapt.megatron_data import SPLITS
from dapt.nemo_launch.settings import LaunchSettings

# Paths inside the container (NeMo r2.0.0rc1 checkout at /opt/NeMo).
CONVERT_SCRIPT = "scripts/checkpoint_converters/convert_llama_hf_to_nemo.py"
PRETRAIN_SCRIPT = "examples/nlp/language_modeling/megatron_gpt_pretraining.py"
CONF_DIR = "examples/nlp/language_modeling/conf"
CONF_NAME = "megatron_llama_config"
# Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP (128 is NeMo's value).
VOCAB_MULTIPLE = 128
# Known NaN/hang workaround on NVSwitch (NVLS) systems, suggested in the tutorial's issue threads:
# NCCL's NVLink SHARP collectives are disabled for the training processes.
BASE_ENV = {"NCCL_NVLS_ENABLE": "0"}


def launch_env(settings: LaunchSettings) -> dict[str, str]:
    """Environment of the training processes. With sequence parallelism megatron-core asks for one CUDA
    connection per device, so that its communication and compute kernels are ordered as it schedules them."""
    env = dict(BASE_ENV)
    if sequence_parallel(settings):
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


def sequence_parallel(settings: LaunchSettings) -> bool:
    """Sequence parallelism splits the layer norms and dropout over the TP ranks; it needs TP > 1."""
    return settings.profile.tensor_parallel > 1


# --- Hydra values -----------------------------------------------------------------------------------------

_HYDRA_ESCAPE = re.compile(r'(\\*)("|\$\{|$)')


def hydra_str(value: str) -> str:
    """A Hydra override string, double-quoted, that composes back to exactly ``value``.

    In a quoted Hydra value a backslash is literal except before a quote; OmegaConf then resolves ``${...}``
    unless written ``\\${``. So a run of backslashes before ``"``, ``${`` or the closing quote is doubled, and
    the ``"`` or ``${`` itself gets one escaping backslash (checked against Hydra 1.3.2 and OmegaConf 2.3.0).
    """

    def escape(match: re.Match) -> str:
        backslashes, special = match.groups()
        return backslashes * 2 + ("\\" + special if special else "")

    return '"' + _HYDRA_ESCAPE.sub(escape, value) + '"'


def _hydra_list(items: list[str]) -> str:
    parts = [item if _is_number(item) else hydra_str(item) for item in items]
    return "[" + ",".join(parts) + "]"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def hydra_data_prefix(blend: dict[str, list[str]]) -> str:
    """``{train:[w,"path",...],validation:[...],test:[...]}`` for ``model.data.data_prefix``."""
    return "{" + ",".join(f"{split}:{_hydra_list(blend[split])}" for split in SPLITS) + "}"


def tokenizer_file(tokenizer: Path) -> Path:
    """The ``tokenizer.model`` of a tokenizer folder (or the file itself)."""
    return tokenizer / "tokenizer.model" if tokenizer.is_dir() or not tokenizer.suffix else tokenizer


# --- commands ---------------------------------------------------------------------------------------------


def convert_command(nemo_dir: str, hf_model: Path, output: Path) -> list[str]:
    """HF -> .nemo with NeMo's converter (arguments: ``get_args()`` of ``convert_llama_hf_to_nemo.py``)."""
    return [
        "python",
        f"{nemo_dir}/{CONVERT_SCRIPT}",
        "--input_name_or_path",
        str(hf_model),
        "--output_path",
        str(output),
        "--precision",
        "bf16",  # weights stored in bf16; the training casts as trainer.precision says
    ]


def pretrain_overrides(
    settings: LaunchSettings, arch: dict[str, Any], blend: dict[str, list[str]], max_time_per_run: str | None
) -> list[str]:
    """Hydra overrides for ``megatron_gpt_pretraining.py`` with ``conf/megatron_llama_config.yaml``.

    With ``restore_from_path`` set, P restores the .nemo with ``cfg.model`` as its whole model config
    (``override_config_path``; save_restore_connector.py 150-165), so every architecture key is set here from the
    checkpoint's config.json, the values NeMo's converter writes into the .nemo (``load_config``).
    ``max_time_per_run`` (Slurm jobs only) makes NeMo stop and save a checkpoint before the time limit.
    """
    profile, layout = settings.profile, settings.layout
    heads = arch["num_attention_heads"]
    lr = profile.learning_rate
    overrides = [
        # trainer (Y: trainer.*; B builds the PTL Trainer and its precision plugin)
        f"trainer.devices={profile.gpus_per_node}",
        f"trainer.num_nodes={profile.num_nodes}",
        f"trainer.precision={settings.precision}",  # B: 32, 16-mixed or bf16-mixed
        f"trainer.max_steps={settings.max_steps}",
        f"trainer.val_check_interval={settings.val_check_interval}",
        # Y: 50 global batches per validation; M builds (max_steps // interval + 1) x this many
        f"trainer.limit_val_batches={settings.limit_val_batches}",
        # parallelism and batch (Y: model.*; M: gradient accumulation = global / (micro x data parallel))
        f"model.tensor_model_parallel_size={profile.tensor_parallel}",
        f"model.pipeline_model_parallel_size={profile.pipeline_parallel}",
        f"model.sequence_parallel={sequence_parallel(settings)}",
        f"model.micro_batch_size={settings.micro_batch_size}",
        f"model.global_batch_size={settings.global_batch_size}",
        # Y: bf16 weights with fp32 main params in the optimizer; NeMo supports O2 with bf16 only
        f"model.megatron_amp_O2={settings.precision == 'bf16-mixed'}",
        f"model.seed={settings.seed}",
        # architecture from the checkpoint's config.json (Y keys; the converter's load_config sets the same)
        f"model.encoder_seq_length={profile.seq_length}",  # Y; model.data.seq_length interpolates it
        f"model.max_position_embeddings={arch.get('max_position_embeddings', profile.seq_length)}",
        f"model.num_layers={arch['num_hidden_layers']}",
        f"model.hidden_size={arch['hidden_size']}",
        f"model.ffn_hidden_size={arch['intermediate_size']}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={arch.get('num_key_value_heads', heads)}",
        f"model.init_method_std={arch.get('initializer_range', 0.02)}",
        f"model.layernorm_epsilon={arch.get('rms_norm_eps', 1e-5)}",
        # rotary_base: read by M (cfg.get('rotary_base')), set by the converter, absent from Y
        f"++model.rotary_base={float(arch.get('rope_theta') or 10000.0)}",
        # no padding rows: the vocab is already a multiple of 128 x TP (checked before launch)
        f"model.make_vocab_size_divisible_by={VOCAB_MULTIPLE}",
        # the adapted tokenizer (Y: model.tokenizer.library / model.tokenizer.model)
        "model.tokenizer.library=sentencepiece",
        f"model.tokenizer.model={hydra_str(str(tokenizer_file(settings.tokenizer)))}",
        # continued pretraining from the converted .nemo (P: cfg.model.get('restore_from_path'); Y has only
        # a top-level restore_from_path, which P does not read)
        f"++model.restore_from_path={hydra_str(str(layout.converted))}",
        # data blend, dict form train/validation/test (M: build_train_valid_test_datasets; commented out in Y)
        f"++model.data.data_prefix={hydra_data_prefix(blend)}",
        f"model.data.index_mapping_dir={hydra_str(str(layout.index_mapping))}",  # Y
        # ChipNeMo optimiser: Adam (0.9, 0.95), weight decay 0.01, constant lr after linear warmup (Y: optim)
        f"model.optim.lr={lr}",
        f"model.optim.weight_decay={profile.weight_decay}",
        f"model.optim.betas=[{profile.adam_beta1},{profile.adam_beta2}]",
        # S: CosineAnnealing with min_lr == lr and constant_steps 0 is a linear warmup, then exactly lr
        # ((lr - min_lr) * cos_term + min_lr = lr); its keyword arguments are Y's sched block
        "model.optim.sched.name=CosineAnnealing",
        f"model.optim.sched.warmup_steps={settings.warmup_steps}",
        "model.optim.sched.constant_steps=0",  # Y has 50000
        f"model.optim.sched.min_lr={lr}",
        # checkpointing and resume (Y: exp_manager.*; E: ExpManagerConfig / CallbackParams). The log dir holds
        # nothing the run reads: exp_manager moves its loose files into run_N/ (see layout.py)
        f"exp_manager.explicit_log_dir={hydra_str(str(layout.log_dir))}",
        f"exp_manager.name={hydra_str(settings.run_name)}",
        "exp_manager.resume_if_exists=True",  # E: resumes from log_dir/checkpoints/*last
        "exp_manager.resume_ignore_no_checkpoint=True",  # E: the first run starts fresh
        "exp_manager.create_checkpoint_callback=True",
        # Y keeps the 10 best by val_loss: about 95 GB each for 7B (bf16 weights, fp32 main weights, Adam)
        f"exp_manager.checkpoint_callback_params.save_top_k={settings.save_top_k}",
        "++exp_manager.checkpoint_callback_params.save_last=True",  # E: the *-last checkpoint resumes
        "exp_manager.checkpoint_callback_params.always_save_nemo=False",
        # C: on_train_end saves log_dir/checkpoints/<name>.nemo
        "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=True",
    ]
    if max_time_per_run is not None:
        # E: a StatelessTimer stops training and saves a checkpoint after this long ("DD:HH:MM:SS")
        overrides.append(f"++exp_manager.max_time_per_run={max_time_per_run}")
    return overrides


def pretrain_argv(nemo_dir: str, overrides: list[str]) -> list[str]:
    """``megatron_gpt_pretraining.py`` with the Llama config (P: ``@hydra_runner(config_path="conf")``)."""
    return [
        f"{nemo_dir}/{PRETRAIN_SCRIPT}",
        f"--config-path={nemo_dir}/{CONF_DIR}",
        f"--config-name={CONF_NAME}",
        *overrides,
    ]


def torchrun_command(gpus_per_node: int, pretrain: list[str]) -> list[str]:
    """Single node: one process per GPU; Lightning reads the ranks torchrun sets."""
    return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus_per_node}", *pretrain]
