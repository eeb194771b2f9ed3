"""Both notebooks execute end to end on the tiny CPU profile, the second reading the first one's outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

papermill = pytest.importorskip("papermill")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, Path]:
    outputs = tmp_path_factory.mktemp("outputs")
    executed = {}
    for name in ("custom_tokenization.ipynb", "domain_adaptive_pretraining.ipynb"):
        target = outputs / name
        papermill.execute_notebook(
            str(REPO / "code" / name), str(target), cwd=str(REPO / "code"),
            parameters={"PROFILE": "tiny", "OUTPUTS": str(outputs)}, kernel_name="python3", progress_bar=False,
        )
        executed[name] = target
    executed["outputs"] = outputs
    return executed


def _outputs_text(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    return "\n".join(
        "".join(out.get("text", "")) + json.dumps(out.get("data", {}))
        for cell in cells if cell["cell_type"] == "code" for out in cell.get("outputs", [])
    )


def test_tokenization_notebook(executed: dict[str, Path]) -> None:
    run = executed["outputs"] / "tiny"
    report = json.loads((run / "tokenizer" / "report.json").read_text())
    assert report["method"] == "guided-bpe" and report["added_tokens"] > 0
    assert report["corpora"]["general_heldout"]["documents_longer"] == 0
    assert (run / "tokenizer_chipnemo" / "report.json").is_file()
    sanity = json.loads((run / "extended_model" / "report.json").read_text())["sanity_check"]
    assert sanity["loads"] and sanity["original_logits_max_abs_diff"] == 0.0
    text = _outputs_text(executed["custom_tokenization.ipynb"])
    assert "| added tokens (before padding) |" in text  # the side-by-side table was shown
    assert "image/png" in text


def test_pretraining_notebook(executed: dict[str, Path]) -> None:
    run = executed["outputs"] / "tiny"
    assert (run / "dapt_model" / "config.json").is_file()
    assert (run / "export" / "verify.json").is_file()
    text = _outputs_text(executed["domain_adaptive_pretraining.ipynb"])
    assert "domain bits/byte" in text
    smoke = run / "smoke_test" / "smoke_test.json"
    if os.environ.get("DAPT_REQUIRE_SERVE") == "1" or smoke.exists():  # CI: the serving environment is built
        report = json.loads(smoke.read_text())
        assert report["passed"] and {"completion", "chat"} <= set(report["checks"])
    else:
        assert "local smoke test NOT run" in text
