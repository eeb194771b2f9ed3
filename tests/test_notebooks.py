"""Both notebooks end to end on the tiny CPU profile, and the user's loop: tweak the tokenizer, rerun both, go back.

The loop, in one outputs folder, nothing deleted by hand: notebook 1 and 2 at the defaults ("first"), notebook 1
with another domain vocabulary size and cap and notebook 2 ("tweaked"), then both at the defaults again ("back").
At each point every record in ``outputs/tiny`` that names the adapted tokenizer names the current one, and the
last point's artifacts equal the first's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

papermill = pytest.importorskip("papermill")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("custom_tokenization.ipynb", "domain_adaptive_pretraining.ipynb")
TWEAK = {"DOMAIN_VOCAB_SIZE": 2000, "MAX_ADDED_TOKENS": 512}
# Stage folders of other tokenizers, by design: the base model's own, and the comparison method's.
OTHER_TOKENIZER_FOLDERS = ("base_model", "base_tokenizer", "tokenizer_chipnemo")
# JSON files that hold no record of which tokenizer an artifact was built with.
NOT_RECORDS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
               "generation_config.json", "domain_tokens.json", "trainer_state.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tokenizer_records(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, SHA-256) of every value recorded under a key that names a tokenizer."""
    found = []
    if isinstance(value, dict):
        if isinstance(value.get("label"), str):  # an evaluation row: its label says which model (and tokenizer)
            path = f"{path}[{value['label']}]"
        for key, item in value.items():
            found += _tokenizer_records(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _tokenizer_records(item, f"{path}[{index}]")
    elif isinstance(value, str) and len(value) == 64 and "tokenizer" in path.lower() and "sha" in path.lower() \
            and "domain_tokens" not in path:
        found.append((path, value))
    return found


def _disagreements(run: Path) -> list[str]:
    """Records in ``run`` naming a tokenizer other than the current adapted (or, for the base, base) one."""
    adapted, base = _sha256(run / "tokenizer" / "tokenizer.model"), _sha256(run / "base_tokenizer" / "tokenizer.model")
    wrong = []
    for record in sorted(run.rglob("*.json")):
        relative = record.relative_to(run)
        if relative.parts[0] in OTHER_TOKENIZER_FOLDERS or record.name in NOT_RECORDS:
            continue
        for key, sha in _tokenizer_records(json.loads(record.read_text(encoding="utf-8"))):
            about_base = "base" in key.lower()
            if sha != (base if about_base else adapted):
                wrong.append(f"{relative}{key} = {sha[:12]}")
    for folder in ("extended_model", "dapt_model", "export"):  # the tokenizer files shipped with the weights
        if _sha256(run / folder / "tokenizer.model") != adapted:
            wrong.append(f"{folder}/tokenizer.model")
    return wrong


def _state(run: Path) -> dict[str, Any]:
    results = json.loads((run / "evaluation" / "results.json").read_text())["results"]
    return {
        "tokenizer": _sha256(run / "tokenizer" / "tokenizer.model"),
        "export_weights": {p.name: _sha256(p) for p in sorted((run / "export").glob("*.safetensors"))},
        "evaluation": {row["label"]: (row["domain"]["bits_per_byte"], row["general"]["bits_per_byte"])
                       for row in results},
        "disagreements": _disagreements(run),
        "smoke_test_passed": json.loads((run / "smoke_test" / "smoke_test.json").read_text())["passed"]
        if (run / "smoke_test" / "smoke_test.json").is_file() else None,
    }


@pytest.fixture(scope="module")
def loop(tmp_path_factory, pytestconfig) -> dict[str, Any]:
    outputs = tmp_path_factory.mktemp("outputs")
    executed: dict[str, dict[str, Path]] = {}
    states, seconds = {}, {}
    for point, tokenizer_parameters in (("first", {}), ("tweaked", TWEAK), ("back", {})):
        executed[point] = {}
        for name in NOTEBOOKS:
            extra = tokenizer_parameters if name == NOTEBOOKS[0] else {}
            target = outputs / "notebooks" / f"{point}_{name}"
            target.parent.mkdir(exist_ok=True)
            started = time.perf_counter()
            papermill.execute_notebook(
                str(REPO / "code" / name), str(target), cwd=str(REPO / "code"),
                parameters={"PROFILE": "tiny", "OUTPUTS": str(outputs), **extra}, kernel_name="python3",
                progress_bar=False,
            )
            seconds[f"{point} {name}"] = round(time.perf_counter() - started, 1)
            executed[point][name] = target
        states[point] = _state(outputs / "tiny")
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")  # shown in CI's log, not captured
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nnotebook seconds: {json.dumps(seconds)}")
            for point, state in states.items():
                reporter.write_line(f"{point}: tokenizer {state['tokenizer'][:12]}, bits/byte (domain, general) "
                                    f"{json.dumps(state['evaluation'])}")
    return {"outputs": outputs, "executed": executed, "states": states}


def _cells(notebook: Path) -> list[dict]:
    return [cell for cell in json.loads(notebook.read_text())["cells"] if cell["cell_type"] == "code"]


def _outputs_text(notebook: Path) -> str:
    return "\n".join(
        "".join(out.get("text", "")) + json.dumps(out.get("data", {}))
        for cell in _cells(notebook) for out in cell.get("outputs", [])
    )


def test_tokenization_notebook(loop: dict[str, Any]) -> None:
    run = loop["outputs"] / "tiny"
    notebook = loop["executed"]["back"]["custom_tokenization.ipynb"]
    report = json.loads((run / "tokenizer" / "report.json").read_text())
    assert report["method"] == "guided-bpe" and report["added_tokens"] > 0
    assert report["corpora"]["general_heldout"]["documents_longer"] == 0
    assert (run / "tokenizer_chipnemo" / "report.json").is_file()
    sanity = json.loads((run / "extended_model" / "report.json").read_text())["sanity_check"]
    assert sanity["loads"] and sanity["original_logits_max_abs_diff"] == 0.0
    text = _outputs_text(notebook)
    assert "| added tokens (before padding) |" in text  # the side-by-side table was shown
    assert "| original logits max abs diff | 0.0 |" in text  # the sanity check, not `null`
    assert "image/png" in text


def test_pretraining_notebook(loop: dict[str, Any]) -> None:
    run = loop["outputs"] / "tiny"
    notebook = loop["executed"]["back"]["domain_adaptive_pretraining.ipynb"]
    assert (run / "dapt_model" / "config.json").is_file()
    assert json.loads((run / "export" / "verify.json").read_text())["passed"]
    text = _outputs_text(notebook)
    assert "[FAILED]" not in text and "NeMo launch not run" not in text
    assert "What a GPU user would see" in text and str(run / "nemo_run") in text  # the tiny run's own plan
    assert "outputs/llama2-7b" not in text
    assert text.count("| model | domain bits/byte |") == 1, "the evaluation table is shown once"
    assert "dapt_nextline_domain (acc_norm)" in text  # lm-eval's results in the table
    smoke = run / "smoke_test" / "smoke_test.json"
    if os.environ.get("DAPT_REQUIRE_SERVE") == "1" or smoke.exists():  # CI: the serving environment is built
        report = json.loads(smoke.read_text())
        assert report["passed"] and {"completion", "chat"} <= set(report["checks"])
    else:
        assert "local smoke test NOT run" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_executed_notebooks_stay_readable(loop: dict[str, Any], name: str) -> None:
    """Progress bars are one widget each (ipywidgets), not one output per refresh; no missing-widget warning."""
    notebook = loop["executed"]["first"][name]
    for cell in _cells(notebook):
        outputs = cell.get("outputs", [])
        refreshes = [out for out in outputs if out["output_type"] == "stream" and "\r" in "".join(out["text"])]
        assert refreshes == [], "".join(cell["source"])[:200]  # a console bar: one output per refresh
        assert len(outputs) <= 40, "".join(cell["source"])[:200]  # was 166 for the evaluation cell
    assert "IProgress not found" not in _outputs_text(notebook)


def test_tweaking_the_tokenizer_and_going_back(loop: dict[str, Any]) -> None:
    states = loop["states"]
    for point, state in states.items():
        assert state["disagreements"] == [], f"{point}: artifacts of another tokenizer: {state['disagreements']}"
        assert state["smoke_test_passed"] in (True, None), point
    first, tweaked, back = states["first"], states["tweaked"], states["back"]
    assert tweaked["tokenizer"] != first["tokenizer"], "the tweak changed the tokenizer"
    assert tweaked["export_weights"] != first["export_weights"]
    assert back["tokenizer"] == first["tokenizer"]
    assert back["export_weights"] == first["export_weights"]
    assert back["evaluation"] == first["evaluation"]
    tweaked_training = _outputs_text(loop["executed"]["tweaked"]["domain_adaptive_pretraining.ipynb"])
    assert "changed since the checkpoints were written: training afresh" in tweaked_training
    assert "Traceback" not in tweaked_training


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="reading as another user id needs root and setpriv")
def test_the_export_is_readable_by_another_user(loop: dict[str, Any]) -> None:
    """NIM containers often run as a non-root user on a mounted export."""
    export = loop["outputs"] / "tiny" / "export"
    folder = export
    while folder != folder.parent:  # the test's own temporary parents are private: open them for the check
        if folder.stat().st_mode & 0o005 != 0o005:
            folder.chmod(folder.stat().st_mode | 0o005)
        folder = folder.parent
    for path in sorted(export.iterdir()):
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
                                capture_output=True)
        assert result.returncode == 0, (path.name, result.stderr)
