"""The tokenizer stage's outputs as the code before the package split (commit 5bd8b34) wrote them.

``test_tokenizer.py::test_outputs_equal_the_recorded_pre_split_outputs`` runs the four cases below with the
current code and compares the SHA-256 of every output file with a record in ``tokenizer_golden.json``
written by the OLD code on the same inputs with the same library versions. A record applies only where
the library versions AND the input files' SHA-256 are those it was made with (outputs legitimately change
with SentencePiece, protobuf, numpy or tokenizers releases, and the tiny sample is assembled from the
installed packages and Python's own standard library); elsewhere the test skips and says which differ.

Record again (only to accept a deliberate change of outputs, or for new library versions), from the
repository root, once per environment::

    git archive 5bd8b34 code/dapt | tar -x -C /tmp/tok_old        # or the commit whose outputs are wanted
    PYTHONPATH=/tmp/tok_old/code .venv/bin/python tests/tokenizer_golden.py --record 5bd8b34
    PYTHONPATH=/tmp/tok_old/code .venv-container/bin/python tests/tokenizer_golden.py --record 5bd8b34

This module uses only what the pre-split code also had: the CLI (``dapt.cli.main``) and plain files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

RECORD_FILE = Path(__file__).with_name("tokenizer_golden.json")
LIBRARIES = ("sentencepiece", "protobuf", "numpy", "tokenizers", "pyahocorasick")
OUTPUT_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "domain_tokenizer.model", "domain_tokens.json", "report.json")
TIMING_KEYS = ("seconds", "cpu_seconds")

# The tiny profile's notebook values, and the ../shared fixtures of test_tokenizer.py (the real Llama 2 base).
TINY_OPTIONS = ["--domain-vocab-size", "4000", "--max-added-tokens", "1024"]
SHARED_OPTIONS = ["--domain-vocab-size", "8000", "--max-added-tokens", "1500"]
METHODS = ("guided-bpe", "chipnemo")


def library_versions() -> dict[str, str]:
    """The versions that decide the outputs' bytes: Python (major.minor) and the libraries the stage uses."""
    versions = {"python": ".".join(platform.python_version_tuple()[:2])}
    versions.update({name: version(name) for name in LIBRARIES})
    return versions


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def input_fingerprints(roots: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of every input file, keyed ``root-name/relative path``."""
    found = {}
    for name, root in roots.items():
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            key = name if path == root else f"{name}/{path.relative_to(root)}"
            found[key] = sha256(path)
    return found


def _relative(value, roots: dict[str, Path]):
    if isinstance(value, dict):
        return {k: _relative(v, roots) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, roots) for v in value]
    if isinstance(value, str):
        for name, root in roots.items():
            value = value.replace(str(root), f"<{name}>")
    return value


def normalised_report(path: Path, roots: dict[str, Path]) -> bytes:
    """report.json without its timings, input paths written relative to their roots, as canonical JSON."""
    report = json.loads(path.read_text(encoding="utf-8"))
    for key in TIMING_KEYS:
        report.pop(key, None)
    report.get("selection", {}).pop("bpe_seconds", None)
    return json.dumps(_relative(report, roots), sort_keys=True).encode()


def output_digests(folder: Path, roots: dict[str, Path]) -> dict[str, str]:
    """SHA-256 of each output file (report.json normalised, see :func:`normalised_report`)."""
    digests = {}
    for name in OUTPUT_FILES:
        data = normalised_report(folder / name, roots) if name == "report.json" else (folder / name).read_bytes()
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def tiny_inputs(folder: Path, cli) -> dict[str, Path]:
    """Build the embedded sample and the miniature base tokenizer under ``folder``; returns the input roots."""
    roots = {"domain": folder / "data", "general": folder / "general_data", "heldout": folder / "heldout",
             "base": folder / "base_tokenizer" / "tokenizer.model"}
    assert cli(["sample-data", "--domain-output", str(roots["domain"]), "--general-output", str(roots["general"]),
                "--heldout-output", str(roots["heldout"])]) == 0
    assert cli(["base-tokenizer", "--general-data", str(roots["general"]),
                "--output", str(folder / "base_tokenizer")]) == 0
    return roots


def shared_inputs(shared: Path) -> dict[str, Path]:
    """The input roots of the ../shared cases."""
    data = shared / "data"
    return {"domain": data / "domain", "general": data / "general", "heldout": data / "heldout",
            "base": shared / "models" / "llama2-tokenizer" / "tokenizer.model"}


def tokenizer_arguments(roots: dict[str, Path], method: str, options: list[str], output: Path) -> list[str]:
    """The CLI arguments of one case."""
    held = "domain_heldout.jsonl", "general_heldout.jsonl"
    if (roots["heldout"] / "domain").is_dir():  # the embedded sample's layout
        held = "domain/domain_heldout.jsonl", "general/general_heldout.jsonl"
    return ["tokenizer", "--base-tokenizer", str(roots["base"]), "--domain-data", str(roots["domain"]),
            "--general-data", str(roots["general"]), "--heldout-domain", str(roots["heldout"] / held[0]),
            "--heldout-general", str(roots["heldout"] / held[1]), "--method", method, *options,
            "--output", str(output)]


def case_fingerprints(suite: str, roots: dict[str, Path], output: Path) -> tuple[dict, dict]:
    """(inputs, outputs) of one case: the tiny suite's base tokenizer is built by the code under test, so it
    counts as an output there and as an input on ../shared."""
    built_base = suite == "tiny"
    inputs = input_fingerprints({k: v for k, v in roots.items() if not (built_base and k == "base")})
    outputs = output_digests(output, roots)
    if built_base:
        outputs["base_tokenizer/tokenizer.model"] = sha256(roots["base"])
    return inputs, outputs


def matching_record(case: str, versions: dict, inputs: dict) -> tuple[dict | None, str]:
    """The record of ``case`` made with these versions and inputs, or None and why there is none."""
    records = json.loads(RECORD_FILE.read_text())["records"] if RECORD_FILE.is_file() else []
    same_case = [r for r in records if r["case"] == case]
    same_versions = [r for r in same_case if r["versions"] == versions]
    if not same_versions:
        recorded = "; ".join(json.dumps(r["versions"], sort_keys=True) for r in same_case) or "none"
        return None, (f"no {case} record for library versions {json.dumps(versions, sort_keys=True)} "
                      f"(recorded: {recorded}); see tests/tokenizer_golden.py to record one")
    for record in same_versions:
        if record["inputs"] == inputs:
            return record, ""
    differing = sorted(k for k in set(inputs) | set(same_versions[0]["inputs"])
                       if inputs.get(k) != same_versions[0]["inputs"].get(k))
    return None, f"{case}: the input files differ from the recorded ones ({', '.join(differing[:5])})"


def record(commit: str, shared: Path) -> None:
    """Run every case with the ``dapt`` on the path and add (or replace) its records for these versions."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))  # a PYTHONPATH comes first
    from dapt.cli import main as cli

    versions = library_versions()
    new = []
    with tempfile.TemporaryDirectory(prefix="tokenizer_golden_") as tmp:
        suites = [("tiny", tiny_inputs(Path(tmp) / "tiny", cli), TINY_OPTIONS)]
        if (shared / "data").is_dir():
            suites.append(("shared", shared_inputs(shared), SHARED_OPTIONS))
        for suite, roots, options in suites:
            for method in METHODS:
                output = Path(tmp) / f"{suite}-{method}"
                assert cli(tokenizer_arguments(roots, method, options, output)) == 0
                inputs, outputs = case_fingerprints(suite, roots, output)
                new.append({"case": f"{suite}-{method}", "commit": commit, "versions": versions,
                            "inputs": inputs, "outputs": outputs})
    old = json.loads(RECORD_FILE.read_text())["records"] if RECORD_FILE.is_file() else []
    kept = [r for r in old if not any(r["case"] == n["case"] and r["versions"] == versions for n in new)]
    RECORD_FILE.write_text(json.dumps({"records": kept + new}, indent=1) + "\n")
    for entry in new:
        print(entry["case"], json.dumps(entry["outputs"], indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="record the tokenizer stage's output hashes (see the docstring)")
    parser.add_argument("--record", metavar="COMMIT", required=True, help="commit of the code on PYTHONPATH")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    arguments = parser.parse_args()
    record(arguments.record, arguments.shared)
