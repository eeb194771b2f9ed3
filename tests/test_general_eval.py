"""General capability on lm-evaluation-harness: the local next-line tasks, run offline for real."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from tiny_model_fixture import build_tiny_model

from dapt.config import CODE_DIR
from dapt.evaluate import EvaluateConfig, evaluate
from dapt.general_eval import (
    CHOICES,
    GeneralEvalError,
    import_lm_eval,
    nextline_items,
    requested_tasks,
    task_manager,
    write_local_tasks,
)

HELDOUT = CODE_DIR / "heldout"


def _texts(kind: str, limit: int | None = None) -> list[str]:
    path = HELDOUT / kind / f"{kind}_heldout.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent; run `python -m dapt sample-data`")
    lines = path.read_text(encoding="utf-8").splitlines()[:limit]
    return [json.loads(line)["text"] for line in lines if line.strip()]


def test_nextline_items_ask_for_the_true_next_line() -> None:
    texts = _texts("domain", 12)
    items = nextline_items(texts, 30, seed=3)
    assert len(items) == 30 and items == nextline_items(texts, 30, seed=3)
    assert items != nextline_items(texts, 30, seed=4)
    for item in items:
        assert len(item["choices"]) == CHOICES == len({c.strip() for c in item["choices"]})
        assert item["context"].endswith("\n") and len(item["context"]) <= 601
        answer = item["choices"][item["label"]]
        # the context and the answer are consecutive lines of one held-out document
        assert any(item["context"] + answer + "\n" in text or text.endswith(item["context"] + answer)
                   for text in texts)
        for k, choice in enumerate(item["choices"]):
            if k != item["label"]:
                assert not any(item["context"] + choice in text for text in texts)
    assert len({item["label"] for item in items}) > 1  # the answer is not always in one place


def test_too_little_text_is_refused_clearly() -> None:
    with pytest.raises(GeneralEvalError, match="too few lines"):
        nextline_items(["short\nlines\nonly"], 5)


def test_no_tasks_means_no_lm_eval_step() -> None:
    assert requested_tasks(("none",)) == [] and requested_tasks(()) == []
    assert requested_tasks(("mmlu", "hellaswag")) == ["mmlu", "hellaswag"]
    with pytest.raises(GeneralEvalError, match="repeats"):
        requested_tasks(("mmlu", "mmlu"))


def test_missing_lm_eval_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(GeneralEvalError, match=r"pip install 'lm-eval\[hf\]==0\.4\.13'.*--lm-eval-tasks none"):
        import_lm_eval()


@pytest.fixture(scope="module")
def lm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval==0.4.13)")
    root = tmp_path_factory.mktemp("general_eval")
    texts = _texts("general", 40) + _texts("domain", 40)
    return {"root": root, "a": build_tiny_model(root / "a", texts, 384, seed=0, max_positions=1024),
            "b": build_tiny_model(root / "b", texts, 448, seed=1, max_positions=1024)}


def _own_accuracy(folder: Path, items: list[dict]) -> float:
    """acc written out: the choice with the highest log-likelihood after [BOS] + context, per item."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).float().eval()
    correct = 0
    for item in items:
        context = tokenizer(item["context"])["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + choice)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return correct / len(items)


def test_lm_eval_runs_the_local_tasks_offline_in_the_evaluation(lm_models, monkeypatch) -> None:
    attempts = []

    def no_network(self, address):  # noqa: ANN001, ANN202
        attempts.append(address)
        raise OSError("this test runs offline")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = lm_models["root"] / "evaluation"
    evaluate(EvaluateConfig(models=(lm_models["a"], lm_models["b"]), labels=("a", "b"), output=out,
                            max_documents=6, lm_eval_items=12))
    assert attempts == []
    record = json.loads((out / "results.json").read_text())
    assert record["lm_eval"]["version"] == "0.4.13"
    assert record["lm_eval"]["tasks"] == ["dapt_nextline_domain", "dapt_nextline_general"]
    items = {task: [json.loads(line) for line in (out / "lm_eval_tasks" / f"{task}.jsonl").read_text().splitlines()]
             for task in record["lm_eval"]["tasks"]}
    for row in record["results"]:
        for task, result in row["lm_eval"].items():
            assert result["metric"] == "acc_norm" and result["samples"] == 12
            assert 0 <= result["value"] <= 1 and result["stderr"] is not None
            # lm-eval's acc is what scoring each choice by hand gives
            assert result["all"]["acc,none"] == pytest.approx(_own_accuracy(Path(row["path"]), items[task]))
    table = (out / "results.md").read_text()
    assert "dapt_nextline_domain (acc_norm) |" in table.splitlines()[0]
    assert all(cell.strip() for cell in table.splitlines()[2].split("|")[1:-1])
    assert (out / "bits_per_byte.png").stat().st_size > 1000


def test_unknown_lm_eval_task_is_refused_before_any_model_loads(lm_models, tmp_path) -> None:
    write_local_tasks(tmp_path / "tasks", {"domain": _texts("domain", 6), "general": _texts("general", 6)}, 5)
    with pytest.raises(GeneralEvalError, match=r"knows no task \['no_such_task'\]"):
        task_manager([tmp_path / "tasks"], ["dapt_nextline_domain", "no_such_task"])
    with pytest.raises(GeneralEvalError, match="no_such_task"):
        evaluate(EvaluateConfig(models=(lm_models["a"],), output=tmp_path / "out", lm_eval_tasks=("no_such_task",)))
    assert not (tmp_path / "out").exists()


def test_lm_eval_progress_bars_are_tqdm_auto_while_it_runs() -> None:
    """In a notebook, lm-eval's console bars would add one output per refresh; tqdm.auto draws one widget."""
    pytest.importorskip("lm_eval")
    import importlib

    from tqdm.auto import tqdm as auto_tqdm

    from dapt.general_eval import _LM_EVAL_PROGRESS_MODULES, _auto_progress_bars

    modules = [importlib.import_module(name) for name in _LM_EVAL_PROGRESS_MODULES]
    before = [module.tqdm for module in modules]
    with _auto_progress_bars():
        assert all(module.tqdm is auto_tqdm for module in modules)
    assert [module.tqdm for module in modules] == before
