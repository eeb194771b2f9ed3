"""``python -m dapt <stage> ...``: one sub-command per pipeline stage.

The options of each sub-command are generated from the stage's config
dataclass, so there is exactly one definition of every parameter. Stage
modules are imported only when their sub-command runs (some import torch).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

# name -> (module, config class, entry function, one-line description)
STAGES: dict[str, tuple[str, str, str, str]] = {
    "sample-data": ("dapt.corpus", "SampleDataConfig", "build_sample_data",
                    "collect the embedded offline domain and general samples into JSONL"),
    "base-tokenizer": ("dapt.tokenizer", "BaseTokenizerConfig", "train_base_tokenizer",
                       "train the tiny profile's miniature base tokenizer with Llama 2's trainer settings"),
    "tokenizer": ("dapt.tokenizer", "TokenizerConfig", "adapt_tokenizer",
                  "train a domain tokenizer and merge its useful pieces into the base tokenizer"),
    "base-model": ("dapt.basemodel", "BaseModelConfig", "build_base_model",
                   "build the tiny base model, or convert a llama2.c checkpoint to HF"),
    "embeddings": ("dapt.embeddings", "EmbeddingsConfig", "extend_embeddings",
                   "extend and initialise the embedding and output layers for the adapted tokenizer"),
    "data": ("dapt.megatron_data", "DataConfig", "build_megatron_data",
             "tokenize JSONL into Megatron indexed datasets (.bin/.idx)"),
    "launch": ("dapt.nemo_launch", "LaunchConfig", "launch",
               "convert to .nemo and run NeMo continued pretraining (container, GPUs)"),
    "train": ("dapt.cpu_train", "TrainConfig", "train",
              "continued pretraining on CPU for small models (HF Trainer)"),
    "evaluate": ("dapt.evaluate", "EvaluateConfig", "evaluate",
                 "bits per byte on held-out domain and general text"),
    "export": ("dapt.export", "ExportConfig", "export",
               "export the trained model for NIM and verify it"),
    "serve": ("dapt.serve", "ServeConfig", "serve",
              "serve an exported model locally (OpenAI-compatible, CPU) with the serving environment"),
    "smoke-test": ("dapt.export", "SmokeTestConfig", "smoke_test",
                   "send completion and chat requests to an OpenAI-compatible endpoint"),
}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, tp: Any) -> None:
    flag = "--" + field.name.replace("_", "-")
    help_text = field.metadata.get("help", "")
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
    if not required:
        kwargs["default"] = argparse.SUPPRESS
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs["help"] = f"{help_text} (default: {default})"
    else:
        kwargs["required"] = True
    tp, _ = _unwrap_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(get_args(tp)[0])
    elif origin in (tuple, list):
        inner = get_args(tp)[0]
        kwargs["nargs"] = "+"
        kwargs["type"] = Path if inner is Path else inner
    elif tp in (int, float, str, Path):
        kwargs["type"] = tp
    else:
        raise TypeError(f"unsupported CLI type {tp!r} for field {field.name}")
    parser.add_argument(flag, **kwargs)


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """Add one ``--kebab-case`` option per field of ``config_cls``."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.init:
            _add_field(parser, field, hints[field.name])


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """Build the config dataclass from parsed arguments (tuples stay tuples)."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for field in dataclasses.fields(config_cls):
        if field.name in vars(args):
            value = getattr(args, field.name)
            base, _ = _unwrap_optional(hints[field.name])
            if get_origin(base) is tuple and isinstance(value, list):
                value = tuple(value)
            values[field.name] = value
    return config_cls(**values)


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``stage``'s options are built (its module is imported)."""
    parser = argparse.ArgumentParser(prog="python -m dapt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, (module, cls_name, _, description) in STAGES.items():
        stage_parser = sub.add_parser(name, help=description, description=description)
        if name == stage:
            config_cls = getattr(importlib.import_module(module), cls_name)
            add_dataclass_arguments(stage_parser, config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one stage from the command line; errors from bad input exit with status 2 and a clear message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(stage if stage in STAGES else None)
    args = parser.parse_args(argv)
    module, cls_name, func_name, _ = STAGES[args.stage]
    mod = importlib.import_module(module)
    config = config_from_args(getattr(mod, cls_name), args)
    from dapt.artifacts import STORAGE_ERRNOS, storage_error
    from dapt.errors import UserInputError

    try:
        getattr(mod, func_name)(config)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {storage_error(error, error.filename or 'the output')}", file=sys.stderr)
        return 2
    return 0
