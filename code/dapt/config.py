"""Typed configuration: named profiles and the helpers every stage config uses.

Each stage owns a dataclass of its parameters (``TokenizerConfig`` in
``tokenizer.py`` and so on). The CLI is generated from those dataclasses, so the
command line, the notebooks and Python callers share one definition. Field help
lives in ``field(metadata={"help": ...})`` through :func:`param`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CODE_DIR = REPO_ROOT / "code"
DEFAULT_DOMAIN_DATA = CODE_DIR / "data"
DEFAULT_GENERAL_DATA = CODE_DIR / "general_data"
DEFAULT_OUTPUTS = REPO_ROOT / "outputs"


def param(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:  # noqa: A002
    """A dataclass field with a help text for the generated CLI."""
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class Profile:
    """A named hardware and model setup. ``tiny`` runs on a laptop CPU; the others in the NeMo container."""

    name: str
    description: str
    model_family: str
    num_nodes: int = 1
    gpus_per_node: int = 0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 256
    learning_rate: float = 5e-6
    warmup_steps: int = 20
    max_steps: int = 1000
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    precision: str = "bf16-mixed"
    general_share: float = 0.09
    max_tensor_parallel: int = 8
    # added for the NeMo launch (nemo_launch.py): validation cadence, model size and the GPU it is sized for
    val_check_interval: int = 100
    model_size: str = "7b"
    gpu_memory_gb: int = 80

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        Profile(
            name="tiny",
            description="CPU: a miniature Llama on the embedded sample data (minutes on 2 cores)",
            model_family="llama",
            model_size="tiny",
            gpus_per_node=0,
            seq_length=256,
            micro_batch_size=8,
            global_batch_size=8,
            learning_rate=1e-3,
            warmup_steps=10,
            max_steps=100,
            precision="32",
            general_share=0.1,
        ),
        Profile(
            name="llama2-7b",
            description="Llama-2-7b on 2 x A100 80GB, TP=2 (the tutorial's setup)",
            model_family="llama",
            gpus_per_node=2,
            tensor_parallel=2,
        ),
        Profile(
            name="llama2-7b-8gpu",
            description="Llama-2-7b on 8 x A100 80GB, TP=2, data parallel 4",
            model_family="llama",
            gpus_per_node=8,
            tensor_parallel=2,
        ),
        Profile(
            name="llama2-7b-multinode",
            description="Llama-2-7b on 4 nodes x 8 A100 80GB, TP=2 (Slurm)",
            model_family="llama",
            num_nodes=4,
            gpus_per_node=8,
            tensor_parallel=2,
        ),
        Profile(
            name="llama2-13b",
            description="Llama-2-13b on 8 x A100 80GB, TP=4, data parallel 2",
            model_family="llama",
            model_size="13b",
            gpus_per_node=8,
            tensor_parallel=4,
        ),
        Profile(
            name="llama2-70b",
            description="Llama-2-70b on 8 nodes x 8 A100 80GB, TP=8, PP=4, data parallel 2 (Slurm)",
            model_family="llama",
            model_size="70b",
            num_nodes=8,
            gpus_per_node=8,
            tensor_parallel=8,
            pipeline_parallel=4,
        ),
    )
}


def get_profile(name: str) -> Profile:
    """Look up a profile by name, with a clear error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None


# --- stage defaults per profile ----------------------------------------------------------------------------

# Stage settings that differ between the tiny CPU profile (the dataclass defaults) and every GPU profile,
# by config class name.
GPU_STAGE_SETTINGS: dict[str, dict[str, Any]] = {
    "TokenizerConfig": {"domain_vocab_size": 16000, "max_added_tokens": None},
}


def _rerooted(value: Any, profile: str) -> Any:
    """A default path under ``outputs/tiny`` moved under ``outputs/<profile>``; other values unchanged."""
    if isinstance(value, Path):
        tiny = DEFAULT_OUTPUTS / "tiny"
        if value == tiny or tiny in value.parents:
            return DEFAULT_OUTPUTS / profile / value.relative_to(tiny)
    return value


def stage_defaults(config_cls: type, profile_name: str = "tiny") -> dict[str, Any]:
    """The defaults of a stage's config under a profile, every value concrete where the profile gives one.

    The dataclass defaults are the tiny profile's. Under another profile, default paths move from
    ``outputs/tiny/...`` to ``outputs/<profile>/...``, the GPU settings of :data:`GPU_STAGE_SETTINGS` apply,
    and a field left ``None`` that a :class:`Profile` also has (``max_steps``, ``general_share``, ...) shows
    the profile's value. A ``profile`` field is set to the profile's name.
    """
    profile = get_profile(profile_name)
    profile_values = dataclasses.asdict(profile)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            continue
        if field.name == "profile":
            value = profile.name
        elif value is None and field.name in profile_values:
            value = profile_values[field.name]
        values[field.name] = _rerooted(value, profile.name)
    if profile.name != "tiny":
        values.update({k: v for k, v in GPU_STAGE_SETTINGS.get(config_cls.__name__, {}).items() if k in values})
    return values


def config_for(config_cls: type, profile: str = "tiny", **overrides: Any) -> Any:
    """A stage config with the profile's defaults and the given overrides (what the notebooks use)."""
    return config_cls(**{**stage_defaults(config_cls, profile), **overrides})
