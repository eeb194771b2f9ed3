"""``python -m dapt <stage> [options]``: one command per pipeline stage, built from the stage's config dataclass.

The options of each stage are the fields of its config dataclass (help from ``dapt.config.param``), turned into
a command line by tyro, so the command line, the notebooks and Python callers share one definition. tyro was
chosen over jsonargparse because it reads these dataclasses as they are, gives kebab-case flags and
``--flag/--no-flag`` booleans (the command lines in the docs stay valid) and shows each default once, in its
plain form. Every stage also takes:

- ``--profile NAME``: the defaults of that profile (paths under ``outputs/NAME``, its sizes); default ``tiny``,
  which is what the notebooks run;
- ``--config FILE.yaml``: options from a YAML mapping (as ``--print-config`` writes it); command-line options
  given after it win;
- ``--print-config``: print the resolved options as YAML and exit without running, so a run is
  reproducible from a file.

Stage modules are imported only when their command runs (some import torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapt.config import PROFILES, param, stage_defaults


@dataclass(frozen=True)
class Stage:
    """Where a stage's config dataclass and entry function live, and what it does (one line)."""

    module: str
    config: str
    entry: str
    description: str


STAGES: dict[str, Stage] = {
    "sample-data": Stage("dapt.corpus", "SampleDataConfig", "build_sample_data",
                         "collect the embedded offline domain and general samples into JSONL"),
    "base-tokenizer": Stage("dapt.tokenizer", "BaseTokenizerConfig", "train_base_tokenizer",
                            "train the tiny profile's miniature base tokenizer with Llama 2's trainer settings"),
    "tokenizer": Stage("dapt.tokenizer", "TokenizerConfig", "adapt_tokenizer",
                       "train a domain tokenizer and merge its useful pieces into the base tokenizer"),
    "base-model": Stage("dapt.basemodel", "BaseModelConfig", "build_base_model",
                        "build the tiny base model, or convert a llama2.c checkpoint to HF"),
    "embeddings": Stage("dapt.embeddings", "EmbeddingsConfig", "extend_embeddings",
                        "extend and initialise the embedding and output layers for the adapted tokenizer"),
    "data": Stage("dapt.megatron_data", "DataConfig", "build_megatron_data",
                  "tokenize JSONL into Megatron indexed datasets (.bin/.idx)"),
    "launch": Stage("dapt.nemo_launch", "LaunchConfig", "launch",
                    "convert to .nemo and run NeMo continued pretraining (container, GPUs)"),
    "train": Stage("dapt.cpu_train", "TrainConfig", "train",
                   "continued pretraining on CPU for small models (HF Trainer)"),
    "evaluate": Stage("dapt.evaluate", "EvaluateConfig", "evaluate",
                      "bits per byte on held-out domain and general text"),
    "export": Stage("dapt.export", "ExportConfig", "export",
                    "export the trained model for NIM and verify it"),
    "serve": Stage("dapt.serve", "ServeConfig", "serve",
                   "serve an exported model locally (OpenAI-compatible, CPU) with the serving environment"),
    "smoke-test": Stage("dapt.smoke_test", "SmokeTestConfig", "smoke_test",
                        "send completion and chat requests to an OpenAI-compatible endpoint"),
}

PROG = "python -m dapt"


@dataclass
class CommonOptions:
    """Options every stage takes besides its own."""

    profile: str = param("tiny", f"defaults of this profile ({', '.join(PROFILES)})")
    config: Path | None = param(None, "YAML file of options (as --print-config writes them); later options win")
    print_config: bool = param(False, "print the resolved options as YAML and exit without running")


COMMON_FIELDS = tuple(f.name for f in dataclasses.fields(CommonOptions))


class CliError(Exception):
    """A command line that cannot be run; the message says why (exit status 2)."""


def top_level_help() -> str:
    """The list of stages, in data-flow order."""
    width = max(len(name) for name in STAGES)
    lines = [f"usage: {PROG} <stage> [options]   ({PROG} <stage> --help lists a stage's options)", "",
             "Domain-adaptive tokenization and pretraining of Llama 2 (the ChipNeMo recipe), stage by stage.", "",
             "stages:"]
    lines += [f"  {name:<{width}}  {stage.description}" for name, stage in STAGES.items()]
    lines += ["", "Every stage also takes --profile NAME, --config FILE.yaml and --print-config."]
    return "\n".join(lines)


def _pre_parse(args: list[str]) -> argparse.Namespace:
    """Read --profile and --config before the stage's own options, whose defaults they decide.

    The profile is the command line's, else the config file's, else ``tiny``.
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--config", type=Path, default=None)
    known, _ = parser.parse_known_args(args)
    known.file_options = read_yaml_options(known.config) if known.config else {}
    if known.profile is None:
        known.profile = str(known.file_options.get("profile", "tiny"))
    if known.profile not in PROFILES:
        raise CliError(f"--profile {known.profile} is not a profile; choose one of: {', '.join(PROFILES)}")
    return known


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_yaml_options(path: Path) -> dict[str, Any]:
    """A YAML mapping of option names (snake or kebab case, given as snake case) to values."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CliError(f"--config {path}: not a readable YAML file ({error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def options_as_arguments(options: dict[str, Any], config_cls: type, path: Path) -> list[str]:
    """Options read from a file, as the command-line arguments that give them (so both parse alike)."""
    known = {f.name for f in dataclasses.fields(config_cls) if f.init} | {"profile"}
    args: list[str] = []
    for name, value in options.items():
        if name not in known:
            raise CliError(f"--config {path}: {name!r} is not an option of this stage; see --help")
        if name == "profile":
            continue
        if isinstance(value, bool):
            args.append(_flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            args += [_flag(name), *("None" if v is None else str(v) for v in value)]
        else:
            args.append(f"{_flag(name)}={'None' if value is None else value}")
    return args


def cli_dataclass(config_cls: type, defaults: dict[str, Any]) -> type:
    """A dataclass for tyro: ``config_cls``'s fields with ``defaults`` as their defaults, then the common options.

    Fields without a default stay required. Help texts and types are ``config_cls``'s own.
    """
    types = {**typing.get_type_hints(CommonOptions), **typing.get_type_hints(config_cls)}
    specs = []
    for field in [*dataclasses.fields(config_cls), *dataclasses.fields(CommonOptions)]:
        if not field.init or any(spec[0] == field.name for spec in specs):
            continue
        if field.name in defaults:
            value = defaults[field.name]
            default = dataclasses.field(default_factory=lambda v=value: v, metadata=field.metadata) \
                if isinstance(value, (list, dict, set)) else dataclasses.field(default=value, metadata=field.metadata)
        else:
            default = dataclasses.field(metadata=field.metadata)
        specs.append((field.name, types[field.name], default))
    required = [spec for spec in specs if spec[2].default is dataclasses.MISSING
                and spec[2].default_factory is dataclasses.MISSING]
    optional = [spec for spec in specs if spec not in required]
    combined = dataclasses.make_dataclass(config_cls.__name__, required + optional)
    combined.__doc__ = config_cls.__doc__
    combined.__module__ = config_cls.__module__
    return combined


def _load(stage: Stage) -> tuple[type, Any]:
    module = importlib.import_module(stage.module)
    return getattr(module, stage.config), getattr(module, stage.entry)


def parse_stage(name: str, args: list[str]) -> tuple[Any, CommonOptions]:
    """The stage's config from its command-line arguments, and the common options given with it."""
    import tyro

    config_cls, _ = _load(STAGES[name])
    known = _pre_parse(args)
    defaults = stage_defaults(config_cls, known.profile)
    defaults.update({"profile": known.profile, "config": known.config, "print_config": False})
    file_args = options_as_arguments(known.file_options, config_cls, known.config)
    parsed = tyro.cli(cli_dataclass(config_cls, defaults), args=file_args + args, prog=f"{PROG} {name}",
                      description=STAGES[name].description)
    values = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(config_cls) if f.init}
    common = CommonOptions(**{f: getattr(parsed, f) for f in COMMON_FIELDS})
    return config_cls(**values), common


def config_yaml(stage: str, config: Any, profile: str | None = None) -> str:
    """The resolved options of a stage as YAML, a file that ``--config`` reads back to the same run."""
    import yaml

    from dapt.artifacts import jsonable

    values = jsonable(config)
    header = f"# {PROG} {stage} --config THIS_FILE\n"
    if profile is not None and "profile" not in values:
        values = {"profile": profile, **values}
    return header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=1000)


def main(argv: list[str] | None = None) -> int:
    """Run one stage from the command line; bad input exits with status 2 and a clear message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    from dapt.artifacts import STORAGE_ERRNOS, storage_error
    from dapt.errors import UserInputError

    try:
        if name not in STAGES:
            raise CliError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
        config, common = parse_stage(name, args)
        if common.print_config:
            print(config_yaml(name, config, common.profile), end="")
            return 0
        _load(STAGES[name])[1](config)
    except (CliError, UserInputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {storage_error(error, error.filename or 'the output')}", file=sys.stderr)
        return 2
    return 0
