"""Version compatibility: the container install files, and dapt.compat's shared SentencePiece proto module.

Runs in both test environments (fresh pins and the NeMo 24.07 container's versions).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# Packages that requirements.txt pins for a fresh machine and that the NeMo 24.07 container already has
# outside the constraints file (the container's JupyterLab is how users open the notebooks).
SHIPPED_BY_THE_CONTAINER = {"jupyterlab"}


def _requirement_lines(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _names(path: Path) -> set[str]:
    return {re.sub(r"[-_.]+", "-", req.name).lower() for req in _requirement_lines(path)}


def _check_script():
    script = REPO / "scripts" / "check_container_install.py"
    spec = importlib.util.spec_from_file_location("check_container_install", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_container_install_covers_every_fresh_requirement():
    fresh = _names(REPO / "requirements.txt")
    container = _names(REPO / "requirements-container.txt") | _names(REPO / "constraints/nemo-24.07.txt")
    missing = fresh - container - SHIPPED_BY_THE_CONTAINER
    assert not missing, f"add {sorted(missing)} to requirements-container.txt (the container lacks them)"


def test_container_constraints_admit_the_containers_own_builds():
    """Every protected package is constrained, and NVIDIA's version strings (torch 2.3.0a0+...) satisfy it."""
    check = _check_script()
    constraints = {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in _requirement_lines(check.CONSTRAINTS)}
    assert set(check.PROTECTED) <= set(constraints)
    for name in check.PROTECTED:
        version = Version(check.CONTAINER_VERSION_STRINGS[name])
        assert constraints[name].specifier.contains(version, prereleases=True), (name, str(version))
    # the fresh pins are outside the container's ranges: installing requirements.txt there would replace them
    fresh = {re.sub(r"[-_.]+", "-", r.name).lower(): r for r in _requirement_lines(REPO / "requirements.txt")}
    for name in ("torch", "transformers", "protobuf", "megatron-core"):
        pinned = Version(str(next(iter(fresh[name].specifier)).version))
        assert not constraints[name].specifier.contains(pinned, prereleases=True), name


def _tiny_sentencepiece_model(folder: Path) -> Path:
    import sentencepiece as spm

    lines = [f"module m{i} (input clk, output reg q); always @(posedge clk) q <= ~q; endmodule" for i in range(50)]
    prefix = folder / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, minloglevel=2,
    )  # fmt: skip
    return prefix.with_suffix(".model")


CONVERT_AND_EDIT = """
import sys
model, order = sys.argv[1], sys.argv[2]

def convert():
    from transformers import LlamaTokenizerFast  # legacy=False makes transformers 4.40 load its proto copy
    fast = LlamaTokenizerFast(vocab_file=model, legacy=False, add_prefix_space=True, from_slow=True)
    return fast("module top; endmodule")["input_ids"]

if order == "compat-first":
    from dapt.compat import sentencepiece_model_pb2
    from sentencepiece import sentencepiece_model_pb2 as direct  # then a direct import is the same module
    assert direct is sentencepiece_model_pb2
    ids = convert()
else:
    ids = convert()
    from dapt.compat import sentencepiece_model_pb2
proto = sentencepiece_model_pb2.ModelProto()
proto.ParseFromString(open(model, "rb").read())
proto.pieces.add(piece="\u2581dapt_added_piece", score=-1000.0, type=1)
import sentencepiece as spm
sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
assert ids[0] == 1 and len(ids) > 2, ids
print(len(proto.pieces), sp.piece_to_id("\u2581dapt_added_piece"))
"""


@pytest.mark.parametrize("order", ["compat-first", "transformers-first"])
def test_sentencepiece_proto_and_transformers_conversion_in_one_process(tmp_path, order):
    """The protobuf 4 'duplicate file name sentencepiece_model.proto' failure of transformers 4.40 stays away."""
    model = _tiny_sentencepiece_model(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", CONVERT_AND_EDIT, str(model), order], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pieces, new_id = map(int, result.stdout.split())
    assert pieces == 401 and new_id == 400
