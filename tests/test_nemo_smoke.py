"""The container smoke test's CPU parts: its logits check, and its commands up to the GPU (dry run).

The GPU part of ``scripts/container_smoke_test.sh`` (conversion, NeMo training, .nemo export) has not been run by
us: no GPU, no NeMo container here. What runs here is everything before it, with the same flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nemo_fixtures import REPO, require_nemo, tiny_artifacts

from dapt.nemo_launch.smoke import RELATIVE_TOLERANCE, compare_logits

SCRIPT = REPO / "scripts" / "container_smoke_test.sh"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return tiny_artifacts(tmp_path_factory.getbasetemp())


def _rewritten(source: Path, out: Path, change) -> Path:
    """A copy of an HF checkpoint with its weights changed by ``change(model)``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    with torch.no_grad():
        change(model)
    model.save_pretrained(out)
    return out


def test_bf16_round_trip_passes_and_a_wrong_layout_fails(tiny, tmp_path) -> None:
    import torch

    heldout = tiny["heldout"] / "domain"

    def to_bf16_and_back(model) -> None:
        for weight in model.parameters():
            weight.copy_(weight.to(torch.bfloat16).float())

    def swap_gate_and_up(model) -> None:  # what a converter that mixed up linear_fc1's halves would give
        mlp = model.model.layers[0].mlp
        gate = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight.copy_(mlp.up_proj.weight)
        mlp.up_proj.weight.copy_(gate)

    bf16 = compare_logits(tiny["hf_model"], _rewritten(tiny["hf_model"], tmp_path / "bf16", to_bf16_and_back),
                          tiny["tokenizer"], heldout)
    assert bf16["passed"] and bf16["mean_abs_diff_over_std"] < RELATIVE_TOLERANCE / 2, bf16
    swapped = compare_logits(tiny["hf_model"], _rewritten(tiny["hf_model"], tmp_path / "swap", swap_gate_and_up),
                             tiny["tokenizer"], heldout)
    assert not swapped["passed"], swapped
    (tmp_path / "numbers.json").write_text(json.dumps({"bf16": bf16, "swapped": swapped}, indent=1))


def _embedded_sample_digests() -> dict[str, str]:
    """SHA-256 of the checkout's embedded sample files (code/data, code/general_data, code/heldout)."""
    import hashlib

    code = REPO / "code"
    files = [*code.glob("data/*.jsonl"), *code.glob("general_data/*.jsonl"), *code.glob("heldout/*/*.jsonl")]
    assert files, "the session's conftest builds the embedded sample first"
    return {str(f.relative_to(code)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_script_says_its_gpu_part_was_not_run_and_runs_to_the_gpu(tmp_path) -> None:
    """Run where the script runs: the container's versions (CI's container-version environment stands in)."""
    text = SCRIPT.read_text()
    assert "NOT RUN BY US" in text and "has never been run by its authors" in text
    require_nemo()
    env = {**os.environ, "DAPT_SMOKE_OUTPUT": str(tmp_path / "smoke"), "DAPT_SMOKE_DRY_RUN": "1",
           "DAPT_SMOKE_BASE_STEPS": "2", "DAPT_SMOKE_STEPS": "5", "PYTHON": sys.executable}
    sample = _embedded_sample_digests()
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the checkout's sample is kept: rebuilt under this Python (another standard library, the general sample's
    # source) it changed the data, and the numbers, of every later run on the checkout
    assert _embedded_sample_digests() == sample
    plan = json.loads((tmp_path / "smoke" / "nemo_launch" / "launch_plan.json").read_text())
    assert plan["ready"] and "--nproc_per_node=1" in plan["pretrain_torchrun"]
    assert "trainer.precision=bf16-mixed" in plan["pretrain_torchrun"]
    assert "trainer.max_steps=5" in plan["pretrain_torchrun"]
    assert "stopping before the GPU part" in done.stdout
