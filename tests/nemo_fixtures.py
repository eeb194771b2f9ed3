"""Artifacts and NeMo runs shared by the ``test_nemo_*`` modules (built once per test session, in its basetemp).

* :func:`tiny_artifacts`: the tiny profile's real artifacts, made by the stages themselves (base tokenizer, base
  model, adapted tokenizer, extended model, domain and general data) on the embedded sample, as the notebooks
  make them (the base model with 2 pretraining steps instead of 240: only its shapes matter here).
* :func:`llama_artifacts`: for the GPU profiles, Llama 2 shapes: the real Llama 2 tokenizer (``../shared``)
  extended to 32768 pieces (a multiple of 128 x 8), data built with it from ``../shared`` held-out text, and an
  HF folder per model size holding Meta's ``config.json`` and the two vocabulary-sized tensors.
* :func:`nemo_probe`: runs ``tests/nemo_probe.py`` (NeMo's own entry points) once over many command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dapt.config import CODE_DIR, PROFILES

REPO = Path(__file__).resolve().parents[1]
SHARED_NEMO = REPO.parent / "shared" / "nemo-r2.0.0rc1"
GPU_PROFILES = [name for name, profile in PROFILES.items() if profile.gpus_per_node > 0]
ALL_PROFILES = list(PROFILES)
MODEL_SIZES = ("7b", "13b", "70b")


def require_nemo() -> Path:
    """NeMo 2.0.0rc1 importable and NeMo's scripts in ../shared; else skip (or fail with DAPT_REQUIRE_NEMO=1)."""
    import importlib.util

    reason = None
    if importlib.util.find_spec("nemo") is None:
        reason = ("NeMo 2.0.0rc1 is not installed in this environment; the container-version environment "
                  "(`bash scripts/setup_env.sh container`, .venv-container) has it")
    elif not (SHARED_NEMO / "examples").is_dir():
        reason = f"{SHARED_NEMO} is absent: NeMo's scripts and configs at r2.0.0rc1 are read from ../shared"
    if reason:
        if os.environ.get("DAPT_REQUIRE_NEMO") == "1":
            pytest.fail(f"DAPT_REQUIRE_NEMO=1 but {reason}")
        pytest.skip(reason)
    return SHARED_NEMO


def _cached(folder: Path, build: Any) -> Path:
    """Build into ``folder`` once per session (a marker file says it is complete)."""
    marker = folder / ".complete"
    if not marker.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build(folder)
        marker.write_text("ok\n")
    return folder


def tiny_artifacts(base: Path) -> dict[str, Path]:
    """The tiny profile's artifacts, built by the stages (notebook settings) on the embedded sample."""
    from dapt.basemodel import BaseModelConfig, build_base_model
    from dapt.embeddings import EmbeddingsConfig, extend_embeddings
    from dapt.megatron_data import DataConfig, build_megatron_data
    from dapt.tokenizer import BaseTokenizerConfig, TokenizerConfig, adapt_tokenizer, train_base_tokenizer

    domain, general = CODE_DIR / "data", CODE_DIR / "general_data"

    def build(root: Path) -> None:
        base_tokenizer = train_base_tokenizer(BaseTokenizerConfig(general_data=general, output=root / "base_tokenizer"))
        base_model = build_base_model(BaseModelConfig(tokenizer=base_tokenizer, general_data=general,
                                                      output=root / "base_model", steps=2))
        tokenizer = adapt_tokenizer(TokenizerConfig(base_tokenizer=base_model, domain_data=domain,
                                                    general_data=general, output=root / "tokenizer",
                                                    domain_vocab_size=4000, max_added_tokens=1024))
        extend_embeddings(EmbeddingsConfig(base_model=base_model, tokenizer=tokenizer, output=root / "extended_model",
                                           vocab_multiple=1024, sanity_check=False))
        for name, source in (("domain", domain), ("general", general)):
            build_megatron_data(DataConfig(tokenizer=tokenizer, input=source,
                                           output_prefix=root / "megatron_data" / name, workers=1))

    root = _cached(base / "tiny-artifacts", build)
    return {"root": root, "hf_model": root / "extended_model", "tokenizer": root / "tokenizer",
            "domain_data": root / "megatron_data" / "domain", "general_data": root / "megatron_data" / "general",
            "domain_jsonl": domain / "domain_sample.jsonl", "general_jsonl": general / "general_sample.jsonl",
            "heldout": CODE_DIR / "heldout"}


def extended_llama_tokenizer(llama2: Path, folder: Path, size: int = 32768) -> Path:
    """Llama 2 + NORMAL pieces scored below every base piece, up to ``size`` (as the tokenizer stage appends),
    with the HF files the tokenizer stage writes."""
    from dapt.compat import sentencepiece_model_pb2 as pb
    from dapt.tokenizer import write_hf_tokenizer

    proto = pb.ModelProto()
    proto.ParseFromString(llama2.read_bytes())
    low = min(p.score for p in proto.pieces) - 1
    for i in range(size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"▁dom{i}", low - i, pb.ModelProto.SentencePiece.NORMAL
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    write_hf_tokenizer(folder)
    return folder


def llama_hf_folder(folder: Path, size: str, tokenizer_model: Path, vocab: int) -> Path:
    """Meta's config.json of Llama-2-<size>-hf with ``vocab`` rows; weights: only the two vocabulary tensors."""
    import numpy as np
    from safetensors.numpy import save_file

    from dapt.nemo_launch import LLAMA2_ARCH

    folder.mkdir(parents=True)
    config = {**LLAMA2_ARCH[size], "vocab_size": vocab, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
              "rope_theta": 10000.0, "rope_scaling": None, "model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    rows = np.zeros((vocab, 2), dtype=np.float16)
    save_file({"model.embed_tokens.weight": rows, "lm_head.weight": rows}, str(folder / "model.safetensors"))
    shutil.copy(tokenizer_model, folder / "tokenizer.model")
    return folder


def llama_artifacts(base: Path, llama2_tokenizer: Path, shared_data: Path) -> dict[str, Any]:
    """Llama 2 shaped inputs for the GPU profiles (see the module docstring)."""
    from dapt.megatron_data import DataConfig, build_megatron_data

    heldout = shared_data / "heldout"

    def build(root: Path) -> None:
        tokenizer = extended_llama_tokenizer(llama2_tokenizer, root / "tokenizer")
        for size in MODEL_SIZES:
            llama_hf_folder(root / f"hf-{size}", size, tokenizer / "tokenizer.model", 32768)
        for name in ("domain", "general"):
            build_megatron_data(DataConfig(tokenizer=tokenizer, input=heldout / f"{name}_heldout.jsonl",
                                           output_prefix=root / "data" / name, split_percent=(90.0, 5.0, 5.0),
                                           workers=1))

    root = _cached(base / "llama-artifacts", build)
    return {"root": root, "tokenizer": root / "tokenizer", "domain_data": root / "data" / "domain",
            "general_data": root / "data" / "general", "heldout": heldout,
            "hf_model": {size: root / f"hf-{size}" for size in MODEL_SIZES}}


def artifacts_for(profile: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Inputs for a profile: tiny artifacts for ``tiny``, Llama 2 shapes (needs ../shared) for the GPU ones."""
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    if profile == "tiny":
        return tiny_artifacts(base)
    found = llama_artifacts(base, request.getfixturevalue("llama2_tokenizer"), request.getfixturevalue("shared_data"))
    return {**found, "hf_model": found["hf_model"][PROFILES[profile].model_size]}


def launch_config(profile: str, artifacts: dict[str, Any], work: Path, **kwargs: Any):
    """The LaunchConfig of a dry run of ``profile`` on ``artifacts``, NeMo's scripts read from ../shared."""
    from dapt.nemo_launch import LaunchConfig

    values = {"profile": profile, "hf_model": artifacts["hf_model"], "tokenizer": artifacts["tokenizer"],
              "domain_data": artifacts["domain_data"], "general_data": artifacts["general_data"],
              "output": work / "nemo_launch", "run_dir": work / "nemo_run", "nemo_dir": str(SHARED_NEMO),
              "dry_run": True, **kwargs}
    return LaunchConfig(**values)


def nemo_probe(request_data: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run ``tests/nemo_probe.py`` with this interpreter on ``request_data``; its result."""
    work.mkdir(parents=True, exist_ok=True)
    request_path, result_path = work / "probe_request.json", work / "probe_result.json"
    request_path.write_text(json.dumps(request_data, indent=1, default=str), encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "nemo_probe.py"), str(request_path),
                           str(result_path)], capture_output=True, text=True, cwd=work)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(result_path.read_text(encoding="utf-8"))


def llama2_setup(root: Path, llama2_tokenizer: Path, shared_data: Path) -> dict[str, Path]:
    """The real Llama 2 tokenizer (32000 pieces), data built with it from held-out text, a 7b-shaped HF folder."""
    from dapt.megatron_data import DataConfig, build_megatron_data

    tok = root / "tokenizer"
    tok.mkdir()
    shutil.copy(llama2_tokenizer, tok / "tokenizer.model")
    for name in ("domain", "general"):
        build_megatron_data(DataConfig(tokenizer=tok, input=shared_data / "heldout" / f"{name}_heldout.jsonl",
                                       output_prefix=root / "data" / name, split_percent=(90.0, 5.0, 5.0),
                                       workers=2))
    return {"root": root, "tokenizer": tok, "hf": llama_hf_folder(root / "hf", "7b", tok / "tokenizer.model", 32000),
            "domain": root / "data" / "domain", "general": root / "data" / "general"}


def dry_run_config(setup: dict[str, Path], tmp_path: Path, **kwargs: Any):
    """A llama2-7b dry run on :func:`llama2_setup`'s inputs, 100 steps, into ``tmp_path``."""
    from dapt.nemo_launch import LaunchConfig

    values = {"profile": "llama2-7b", "hf_model": setup["hf"], "tokenizer": setup["tokenizer"],
              "domain_data": setup["domain"], "general_data": setup["general"], "output": tmp_path / "launch",
              "run_dir": tmp_path / "run", "max_steps": 100, "warmup_steps": 10, "val_check_interval": 50,
              "dry_run": True, **kwargs}
    return LaunchConfig(**values)


def overrides(argv: list[str]) -> dict[str, str]:
    """The Hydra overrides of a pretraining argument list, by key (``++`` kept in the key)."""
    start = next(i for i, a in enumerate(argv) if a.startswith("--config-name=")) + 1
    return dict(arg.split("=", 1) for arg in argv[start:])


def sbatch_arguments(script: str) -> list[str]:
    """The arguments sbatch reads from the ``#SBATCH`` lines, by its rules (src/sbatch/opt.c, ``_get_argument``):
    whitespace separates unless inside "...", a backslash takes the next character, an unescaped # ends."""
    arguments = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        current, quoted, escaped, started = "", False, False, False
        for char in line[len("#SBATCH"):]:
            if escaped:
                current, escaped, started = current + char, False, True
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted, started = not quoted, True
            elif char == "#":
                break
            elif char.isspace() and not quoted:
                if started:
                    arguments.append(current)
                current, started = "", False
            else:
                current, started = current + char, True
        if started:
            arguments.append(current)
    return arguments


# Characters a path may hold that Hydra, OmegaConf or a shell would read as syntax (no control characters).
HOSTILE_PATH_PART = "a b'c\"d\\e ${x} $HOME [f]{g},h=i"
_PROBES: dict[Path, dict[str, Any]] = {}


def planned_and_composed(request: pytest.FixtureRequest) -> dict[str, Any]:
    """For every profile whose inputs are here: its dry-run plan (NeMo's scripts from ../shared) and what NeMo's
    own code makes of it, from one :func:`nemo_probe` run per session:

    * ``plans[profile]``, ``artifacts[profile]``;
    * ``composed[profile]["commands" | "slurm"]``: the config ``megatron_gpt_pretraining.py`` composes from the
      command in commands.sh / dapt.sbatch;
    * ``converter_args``, ``converter_config``: ``convert_llama_hf_to_nemo.py``'s ``get_args`` and ``load_config``;
    * ``export_args``: ``dapt.export``'s ``.nemo`` -> HF command through ``convert_llama_nemo_to_hf.py``'s
      ``get_args``; ``misspelled``: a wrong flag through the same parser;
    * ``hostile``: a tiny plan whose run folder holds :data:`HOSTILE_PATH_PART`; ``unknown_key``: a key the YAML
      lacks, given without ``++``.
    """
    require_nemo()
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    if base in _PROBES:
        return _PROBES[base]
    from dapt.export import nemo_to_hf_command
    from dapt.nemo_launch import build_plan
    from dapt.nemo_launch.stage import write_plan

    plans, missing, inputs = {}, {}, {}
    for profile in ALL_PROFILES:
        try:
            artifacts = inputs[profile] = artifacts_for(profile, request)
        except pytest.skip.Exception as skipped:
            missing[profile] = str(skipped)
            continue
        config = launch_config(profile, artifacts, base / "plans" / profile)
        plans[profile] = build_plan(config)
        write_plan(config, plans[profile])
    tiny = artifacts_for("tiny", request)
    hostile = build_plan(launch_config("tiny", tiny, base / "plans" / HOSTILE_PATH_PART))
    probe: dict[str, Any] = {"compose": {}, "argparse": {}, "load_config": {}}
    for profile, plan in plans.items():
        probe["compose"][f"{profile}/commands"] = plan.pretrain
        probe["compose"][f"{profile}/slurm"] = plan.pretrain_slurm
        convert = {"script": plan.convert[1], "argv": plan.convert[2:]}
        probe["argparse"][f"{profile}/convert"] = convert
        probe["load_config"][profile] = {**convert, "hf_model": str(plan.settings.hf_model)}
        export = nemo_to_hf_command(plan.trained_nemo, base / "plans" / profile / "weights.bin", SHARED_NEMO,
                                    "bfloat16", cpu_only=True)
        probe["argparse"][f"{profile}/export"] = {"script": export[1], "argv": export[2:]}
    probe["compose"]["hostile"] = hostile.pretrain
    probe["compose"]["unknown_key"] = [*plans["tiny"].pretrain, "model.no_such_key=1"]
    probe["argparse"]["misspelled"] = {"script": plans["tiny"].convert[1], "argv": ["--input_path", "x"]}
    result = nemo_probe(probe, base / "probe")
    composed = {profile: {variant: result["compose"][f"{profile}/{variant}"] for variant in ("commands", "slurm")}
                for profile in plans}
    _PROBES[base] = {
        "plans": plans, "missing": missing, "artifacts": inputs, "composed": composed, "hostile_plan": hostile,
        "hostile": result["compose"]["hostile"], "unknown_key": result["compose"]["unknown_key"],
        "converter_args": {p: result["argparse"][f"{p}/convert"] for p in plans},
        "converter_config": result["load_config"],
        "export_args": {p: result["argparse"][f"{p}/export"] for p in plans},
        "export_commands": {p: probe["argparse"][f"{p}/export"] for p in plans},
        "misspelled": result["argparse"]["misspelled"],
    }
    return _PROBES[base]


def profile_case(request: pytest.FixtureRequest, profile: str) -> tuple[Any, dict[str, Any]]:
    """The plan of ``profile`` and the probe's results; skips when the profile's inputs are absent."""
    found = planned_and_composed(request)
    if profile not in found["plans"]:
        pytest.skip(found["missing"][profile])
    return found["plans"][profile], found


STUB_PYTHON = """#!/bin/bash
# stand-in for python (the converter, NeMo): records its arguments; writes the file named by --output_path
n=$(ls "$DAPT_STUB_DIR" | wc -l)
printf '%s\\0' "$@" > "$DAPT_STUB_DIR/call-$n-$(basename "$0")"
while [ $# -gt 0 ]; do
  if [ "$1" = --output_path ]; then printf 'stand-in .nemo\\n' > "$2"; fi
  shift
done
"""
STUB_SRUN = """#!/bin/bash
# stand-in for srun: records its own options (they start with --) and runs the command that follows them
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do printf '%s\\0' "$1" >> "$DAPT_STUB_DIR/srun-options"; shift; done
exec "$@"
"""


def stub_env(folder: Path) -> dict[str, str]:
    """An environment whose PATH finds the stand-ins first; they record their calls under ``folder/calls``."""
    bin_dir, record = folder / "bin", folder / "calls"
    bin_dir.mkdir(parents=True)
    record.mkdir()
    for name, text in (("python", STUB_PYTHON), ("torchrun", STUB_PYTHON), ("srun", STUB_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DAPT_STUB_DIR": str(record)}
