"""Run NeMo's own entry points on our command lines, in one process (NeMo imports once): a test helper.

    python tests/nemo_probe.py REQUEST.json RESULT.json

REQUEST holds, by name:

* ``compose``: argument lists of ``megatron_gpt_pretraining.py`` as we generate them (script path first). Each goes
  through the script's own ``main`` (NeMo's ``hydra_runner``) twice: with ``--cfg job`` (Hydra prints the job's
  config, exit status 0), then as it is, up to the first line of the task, ``MegatronTrainerBuilder(cfg)``, which
  here records ``cfg``, the config the script would train with, and stops. The result: that config, resolved,
  and the printed text; or the error NeMo's Hydra reports.
* ``argparse``: ``{"script": path, "argv": [...]}``: the script's own ``get_args()`` on those arguments.
* ``load_config``: ``{"script": path, "argv": [...], "hf_model": folder}``: the HF -> .nemo converter's
  ``load_config`` on the checkpoint's config, as its ``convert`` calls it (the model config the .nemo gets).

Needs NeMo 2.0.0rc1 (the container-version environment); the scripts come from ``../shared/nemo-r2.0.0rc1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path
from typing import Any


def _load(script: str, cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if script not in cache:
        cache[script] = runpy.run_path(script, run_name="nemo_probe")  # not __main__: defines, runs nothing
    return cache[script]


def _with_argv(argv: list[str], call: Any) -> tuple[Any, str, str, int | None]:
    """Call ``call()`` with ``sys.argv = argv``; its result, stdout, stderr and SystemExit code (None if none)."""
    out, err = io.StringIO(), io.StringIO()
    saved, sys.argv = sys.argv, list(argv)
    code = None
    result = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = call()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    return result, out.getvalue(), err.getvalue(), code


def compose(argv: list[str], scripts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The config NeMo's ``hydra_runner`` composes for ``argv`` and hands to the script's task function."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    main = _load(argv[0], scripts)["main"]
    _, printed, err, code = _with_argv([*argv, "--cfg", "job"], main)
    GlobalHydra.instance().clear()
    if code not in (None, 0):
        return {"error": err.strip()[-2000:] or printed.strip()[-2000:], "exit": code}
    task_globals = main.__wrapped__.__globals__  # the script's own module globals
    captured = []

    def trainer_builder(cfg: Any) -> None:  # stands in for MegatronTrainerBuilder, the task's first call
        captured.append(cfg)
        raise SystemExit(0)  # Hydra reports an Exception as a failure; SystemExit passes through

    real, task_globals["MegatronTrainerBuilder"] = task_globals["MegatronTrainerBuilder"], trainer_builder
    try:
        _, _, err, code = _with_argv(argv, main)
    finally:
        task_globals["MegatronTrainerBuilder"] = real
        GlobalHydra.instance().clear()
    if not captured:
        return {"error": err.strip()[-2000:], "exit": code}
    return {"config": OmegaConf.to_container(captured[0], resolve=True), "printed": printed}


def parse_args(script: str, argv: list[str], scripts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The script's own ``get_args()`` (argparse) on ``argv``: the parsed values, or argparse's error."""
    get_args = _load(script, scripts)["get_args"]
    args, _, err, code = _with_argv([script, *argv], get_args)
    if code not in (None, 0):
        return {"error": err.strip()[-2000:], "exit": code}
    return {"args": vars(args)}


def load_config(script: str, argv: list[str], hf_model: str, scripts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``load_config(args, hf_config)`` of the HF -> .nemo converter, with ``hf_config`` as its ``convert``
    builds it: ``vars(model.config)`` of the HF checkpoint, plus the HF folder's ``tokenizer.model``."""
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    namespace = _load(script, scripts)
    args, _, err, code = _with_argv([script, *argv], namespace["get_args"])
    if code not in (None, 0):
        return {"error": err.strip()[-2000:], "exit": code}
    hf_config = vars(LlamaConfig.from_pretrained(hf_model))
    if (Path(hf_model) / "tokenizer.model").exists():
        hf_config["tokenizer_model"] = str(Path(hf_model) / "tokenizer.model")
    nemo_config = namespace["load_config"](args, hf_config)
    return {"config": OmegaConf.to_container(nemo_config, resolve=True)}


def main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    scripts: dict[str, dict[str, Any]] = {}
    result: dict[str, dict[str, Any]] = {"compose": {}, "argparse": {}, "load_config": {}}
    for name, argv in request.get("compose", {}).items():
        result["compose"][name] = compose(argv, scripts)
    for name, item in request.get("argparse", {}).items():
        result["argparse"][name] = parse_args(item["script"], item["argv"], scripts)
    for name, item in request.get("load_config", {}).items():
        result["load_config"][name] = load_config(item["script"], item["argv"], item["hf_model"], scripts)
    Path(result_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
