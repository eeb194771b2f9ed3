"""The stage's parameters (``LaunchConfig``) and their resolution into checked, final values.

Every value here ends up in a generated script or command line, so :func:`resolve` refuses, before anything is
built, numbers that cannot work (``--max-steps 0``) and text that could break out of its line (control
characters); it never silently replaces a value the user gave.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from dapt.config import DEFAULT_OUTPUTS, Profile, get_profile, param
from dapt.errors import UserInputError
from dapt.nemo_launch.layout import RunLayout

CONTAINER_IMAGE = "nvcr.io/nvidia/nemo:24.07"
# trainer.precision values MegatronTrainerBuilder handles (megatron_trainer_builder.py at r2.0.0rc1).
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
# Slurm --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (sbatch(1), "--time").
_SLURM_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")
_SLURM_UNLIMITED = ("unlimited", "infinite")


@dataclass
class LaunchConfig:
    """Convert the extended checkpoint to .nemo and run NeMo continued pretraining (NeMo 24.07 container)."""

    profile: str = param("tiny", "hardware/model profile (see dapt.config.PROFILES); tiny: one GPU")
    hf_model: Path | None = param(None, "extended HF checkpoint folder; None: outputs/<profile>/extended_model")
    tokenizer: Path | None = param(None, "adapted tokenizer folder; None: outputs/<profile>/tokenizer")
    domain_data: Path | None = param(None, "domain data prefix; None: outputs/<profile>/megatron_data/domain")
    general_data: Path | None = param(
        None, "general data prefix; None: outputs/<profile>/megatron_data/general"
    )
    general_share: float | None = param(None, "replay share of general data, in [0, 1); None: the profile's")
    output: Path | None = param(
        None, "folder for commands.sh, dapt.sbatch and the plan; None: outputs/<profile>/nemo_launch"
    )
    run_dir: Path | None = param(
        None, "NeMo run folder: .nemo files, checkpoints, logs; None: outputs/<profile>/nemo_run"
    )
    run_name: str = param("dapt", "exp_manager name; the trained model is RUN_DIR/training/checkpoints/<name>.nemo")
    max_steps: int | None = param(None, "training steps, at least 1; None: the profile's")
    warmup_steps: int | None = param(None, "linear warmup steps, below max_steps; None: the profile's")
    val_check_interval: int | None = param(None, "validate every N steps, 1..max_steps; None: the profile's")
    limit_val_batches: int = param(
        5, "global batches per validation (NeMo's YAML has 50: about a sixth of the run at 7B's settings)"
    )
    global_batch_size: int | None = param(None, "sequences per optimizer step; None: the profile's")
    micro_batch_size: int | None = param(None, "sequences per GPU per micro step; None: the profile's")
    precision: str | None = param(None, f"trainer.precision, one of {', '.join(PRECISIONS)}; None: the profile's")
    save_top_k: int = param(
        1, "checkpoints kept by best val_loss, besides the last (NeMo's YAML keeps 10: about 1 TB for 7B)"
    )
    seed: int = param(1234, "model.seed")
    nemo_dir: str = param("/opt/NeMo", "NeMo checkout inside the container")
    container_image: str = param(CONTAINER_IMAGE, "container for the Slurm script (pyxis); empty: no container")
    slurm_partition: str = param("", "Slurm partition (empty: the cluster's default)")
    slurm_account: str = param("", "Slurm account (empty: none)")
    slurm_time: str = param("04:00:00", "Slurm time limit; resubmitting resumes from the last checkpoint")
    slurm_time_margin_minutes: int = param(
        15, "NeMo stops and saves this long before the Slurm time limit (exp_manager.max_time_per_run)"
    )
    dry_run: bool = param(False, "only check the inputs, print and write the commands")


@dataclass(frozen=True)
class LaunchSettings:
    """Every value the commands are built from, resolved, absolute and checked."""

    profile: Profile
    hf_model: Path
    tokenizer: Path
    domain_data: Path
    general_data: Path | None  # None when the replay share is 0
    general_share: float
    output: Path
    layout: RunLayout
    max_steps: int
    warmup_steps: int
    val_check_interval: int
    limit_val_batches: int
    global_batch_size: int
    micro_batch_size: int
    precision: str
    save_top_k: int
    seed: int
    nemo_dir: str
    container_image: str
    slurm_partition: str
    slurm_account: str
    slurm_time: str
    max_time_per_run: str | None  # "DD:HH:MM:SS" for exp_manager, from slurm_time minus the margin

    @property
    def run_name(self) -> str:
        return self.layout.run_name


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def refuse_control_characters(name: str, value: str) -> None:
    """Refuse a value with a control character or line separator: in a script it would start a new line."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            code = f"U+{ord(char):04X}"
            raise UserInputError(
                f"{_flag(name)} {value!r}: contains the control character {code}; values that go into the "
                "generated scripts must not contain line breaks, tabs or other control characters."
            )


def _at_least(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserInputError(f"{_flag(name)} {value!r}: must be a whole number of at least {low}.")
    return value


def slurm_time_seconds(value: str) -> int | None:
    """Seconds of a Slurm ``--time`` value; None for UNLIMITED. Raises :class:`UserInputError` otherwise."""
    if value.strip().lower() in _SLURM_UNLIMITED:
        return None
    match = _SLURM_TIME.match(value.strip())
    if not match:
        raise UserInputError(
            f"--slurm-time {value!r}: not a Slurm time limit; use MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or "
            "D-HH:MM:SS (for example 04:00:00)."
        )
    days, d_hours, d_minutes, d_seconds, minutes, m_seconds, h_seconds = match.groups()
    if days is not None:
        total = int(days) * 86400 + int(d_hours) * 3600 + int(d_minutes or 0) * 60 + int(d_seconds or 0)
    elif h_seconds is not None:  # H:M:S
        total = int(minutes) * 3600 + int(m_seconds) * 60 + int(h_seconds)
    else:  # M or M:S
        total = int(minutes) * 60 + int(m_seconds or 0)
    if total <= 0:
        raise UserInputError(f"--slurm-time {value!r}: the time limit must be above zero.")
    return total


def max_time_per_run(slurm_time: str, margin_minutes: int) -> str | None:
    """``exp_manager.max_time_per_run`` ("DD:HH:MM:SS", Lightning's Timer format): the limit minus the margin."""
    limit = slurm_time_seconds(slurm_time)
    if limit is None:
        return None
    left = limit - margin_minutes * 60
    if left < 60:
        raise UserInputError(
            f"--slurm-time {slurm_time!r} with --slurm-time-margin-minutes {margin_minutes}: leaves "
            f"{max(left, 0)} s of training per job; give a longer time limit or a smaller margin."
        )
    days, rest = divmod(left, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{seconds:02d}"


def launch_profile(name: str) -> Profile:
    """The profile for a launch. A CPU profile (``tiny``) has no GPUs: its NeMo plan is the one-GPU run that
    ``scripts/container_smoke_test.sh`` makes in the container."""
    try:
        profile = get_profile(name)
    except ValueError as error:
        raise UserInputError(f"--profile {name!r}: {error}") from None
    if profile.gpus_per_node < 1:
        profile = dataclasses.replace(profile, gpus_per_node=1)
    return profile


def resolve(config: LaunchConfig) -> LaunchSettings:
    """The final values: the user's where given (checked, never replaced), the profile's otherwise."""
    profile = launch_profile(config.profile)
    root = DEFAULT_OUTPUTS / config.profile

    def pick(name: str, low: int) -> int:
        value = getattr(config, name)
        return _at_least(name, getattr(profile, name) if value is None else value, low)

    share = profile.general_share if config.general_share is None else config.general_share
    if not 0.0 <= share < 1.0:
        raise UserInputError(f"--general-share {share!r}: the replay share must be in [0, 1).")
    precision = profile.precision if config.precision is None else config.precision
    if precision not in PRECISIONS:
        raise UserInputError(f"--precision {precision!r}: NeMo's trainer takes one of {', '.join(PRECISIONS)}.")
    for name in ("run_name", "nemo_dir", "container_image", "slurm_partition", "slurm_account", "slurm_time"):
        refuse_control_characters(name, getattr(config, name))
    if not config.run_name or "/" in config.run_name or config.run_name.startswith("."):
        raise UserInputError(
            f"--run-name {config.run_name!r}: must be a plain file name (no '/', not starting with '.'); "
            "it names RUN_DIR/training/checkpoints/<name>.nemo."
        )
    margin = _at_least("slurm_time_margin_minutes", config.slurm_time_margin_minutes, 0)
    paths = {
        "hf_model": Path(config.hf_model or root / "extended_model").absolute(),
        "tokenizer": Path(config.tokenizer or root / "tokenizer").absolute(),
        "domain_data": Path(config.domain_data or root / "megatron_data" / "domain").absolute(),
        "general_data": Path(config.general_data or root / "megatron_data" / "general").absolute(),
        "output": Path(config.output or root / "nemo_launch").absolute(),
        "run_dir": Path(config.run_dir or root / "nemo_run").absolute(),
    }
    for name, path in paths.items():
        refuse_control_characters(name, str(path))
    return LaunchSettings(
        profile=profile,
        hf_model=paths["hf_model"],
        tokenizer=paths["tokenizer"],
        domain_data=paths["domain_data"],
        general_data=paths["general_data"] if share > 0 else None,
        general_share=share,
        output=paths["output"],
        layout=RunLayout(paths["run_dir"], config.run_name),
        max_steps=pick("max_steps", 1),
        warmup_steps=pick("warmup_steps", 0),
        val_check_interval=pick("val_check_interval", 1),
        limit_val_batches=_at_least("limit_val_batches", config.limit_val_batches, 1),
        global_batch_size=pick("global_batch_size", 1),
        micro_batch_size=pick("micro_batch_size", 1),
        precision=precision,
        save_top_k=_at_least("save_top_k", config.save_top_k, 1),
        seed=_at_least("seed", config.seed, 0),
        nemo_dir=config.nemo_dir,
        container_image=config.container_image,
        slurm_partition=config.slurm_partition,
        slurm_account=config.slurm_account,
        slurm_time=config.slurm_time,
        max_time_per_run=max_time_per_run(config.slurm_time, margin),
    )
