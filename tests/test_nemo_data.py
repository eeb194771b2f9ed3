"""NeMo's tokenizer, megatron-core's datasets and NeMo's preprocessing on our artifacts (issue 10, (d), (e), (f)).

Needs NeMo 2.0.0rc1 (the container-version environment). Every object is built from the config NeMo's own
``hydra_runner`` composed from our command line (``nemo_fixtures.planned_and_composed``):

(d) NeMo's tokenizer, built as ``MegatronBaseModel._build_tokenizer`` builds it, gives SentencePiece's and the HF
    tokenizer's ids on every held-out document, and its size is the checkpoint's rows with no padding at any TP;
(e) megatron-core 0.8.0's ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` with the keyword arguments
    ``MegatronGPTModel.build_train_valid_test_datasets`` passes (megatron_gpt_model.py 1479-1568 at r2.0.0rc1)
    samples windows of the adapted tokenizer's ids of our documents, in the blend's proportions;
(f) NeMo's ``preprocess_data_for_megatron.py`` writes the same bytes as our data stage from the same JSONL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nemo_fixtures import ALL_PROFILES, SHARED_NEMO, profile_case, require_nemo, tiny_artifacts

from dapt.corpus import iter_documents
from dapt.megatron_data import SPLITS, DataConfig, assign_splits, build_megatron_data, read_data_record

PREPROCESS = SHARED_NEMO / "scripts" / "nlp_language_modeling" / "preprocess_data_for_megatron.py"


def _nemo_tokenizer(tokenizer_cfg: dict[str, Any]):
    """NeMo's tokenizer as ``MegatronBaseModel._build_tokenizer`` builds it from ``cfg.model.tokenizer``."""
    from nemo.collections.nlp.modules.common.tokenizer_utils import get_nmt_tokenizer

    legacy = tokenizer_cfg.get("sentencepiece_legacy", tokenizer_cfg["library"] == "sentencepiece")
    return get_nmt_tokenizer(
        library=tokenizer_cfg["library"], model_name=tokenizer_cfg.get("type"),
        tokenizer_model=tokenizer_cfg.get("model"), vocab_file=tokenizer_cfg.get("vocab_file"),
        merges_file=tokenizer_cfg.get("merge_file"), use_fast=tokenizer_cfg.get("use_fast", False),
        delimiter=tokenizer_cfg.get("delimiter"), special_tokens=tokenizer_cfg.get("special_tokens"),
        trust_remote_code=tokenizer_cfg.get("trust_remote_code", False), legacy=legacy,
        chat_template=tokenizer_cfg.get("chat_template"),
    )


def _model_cfg(found: dict[str, Any], profile: str) -> dict[str, Any]:
    return found["composed"][profile]["commands"]["config"]


# --- (d) tokenizer -----------------------------------------------------------------------------------------


@cache
def _ids_disagree(model_path: str, tokenizer_folder: str, heldout: str) -> tuple[int, tuple[str, ...]]:
    """(documents compared, where NeMo's, SentencePiece's and the HF tokenizer's ids differ)."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    nemo = _nemo_tokenizer({"library": "sentencepiece", "model": model_path, "sentencepiece_legacy": False})
    sp = spm.SentencePieceProcessor(model_file=model_path)
    hf = AutoTokenizer.from_pretrained(tokenizer_folder)
    compared, disagree = 0, []
    for doc in iter_documents(Path(heldout)):
        ids = sp.encode(doc.text)
        compared += 1
        if nemo.text_to_ids(doc.text) != ids or hf(doc.text, add_special_tokens=False)["input_ids"] != ids:
            disagree.append(f"{doc.path}:{doc.line}")
    return compared, tuple(disagree)


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_d_nemo_tokenizer_matches_sentencepiece_hf_and_the_checkpoint(request, profile) -> None:
    plan, found = profile_case(request, profile)
    from nemo.collections.nlp.models.language_modeling.megatron_base_model import MegatronBaseModel

    from dapt.nemo_launch.checks import checkpoint_vocab_rows

    model = _model_cfg(found, profile)["model"]
    tokenizer = _nemo_tokenizer(model["tokenizer"])
    assert model["tokenizer"]["sentencepiece_legacy"] is False  # the YAML's: plain SentencePiece encoding
    compared, disagree = _ids_disagree(model["tokenizer"]["model"], str(plan.settings.tokenizer),
                                       str(found["artifacts"][profile]["heldout"]))
    assert compared >= 20 and disagree == (), disagree[:10]
    rows = checkpoint_vocab_rows(plan.settings.hf_model)
    config_vocab = json.loads((plan.settings.hf_model / "config.json").read_text())["vocab_size"]
    assert set(rows.values()) == {tokenizer.vocab_size} == {config_vocab}
    padded = MegatronBaseModel._vocab_size_with_padding(None, tokenizer.vocab_size,
                                                        model["make_vocab_size_divisible_by"],
                                                        model["tensor_model_parallel_size"])
    assert padded == tokenizer.vocab_size  # Megatron adds no rows: the checkpoint's rows are the model's
    assert tokenizer.eod == read_data_record(plan.settings.domain_data)["eod_id"]


# --- (e) datasets ------------------------------------------------------------------------------------------


def _documents(prefix: Path, model_path: str) -> dict[str, list[np.ndarray]]:
    """Our documents of each split, encoded again from the source JSONL: SentencePiece ids, then the EOD id."""
    import sentencepiece as spm

    record = read_data_record(prefix)
    parameters = record["parameters"]
    sp = spm.SentencePieceProcessor(model_file=model_path)
    texts = [doc.text for doc in iter_documents(Path(record["input"]), tuple(parameters["text_keys"]))]
    where = assign_splits(len(texts), tuple(parameters["split_percent"]), parameters["seed"])
    documents: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for text, index in zip(texts, where):
        documents[SPLITS[index]].append(np.array([*sp.encode(text), record["eod_id"]], dtype=np.int64))
    return documents


def _is_window_of(window: np.ndarray, documents: list[np.ndarray], eod: int) -> bool:
    """True when ``window`` is a run of whole documents, starting inside one and ending inside one."""
    cuts = np.flatnonzero(window == eod) + 1
    pieces = np.split(window, cuts)
    whole = {doc.tobytes() for doc in documents}
    if len(pieces) == 1:  # inside one document
        data = window.tobytes()
        return any(data in doc.tobytes() and len(doc) >= len(window) for doc in documents)
    first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
    if not all(piece.tobytes() in whole for piece in middle):
        return False
    ends_ok = any(len(doc) >= len(first) and np.array_equal(doc[len(doc) - len(first):], first) for doc in documents)
    starts_ok = len(last) == 0 or any(np.array_equal(doc[: len(last)], last) for doc in documents)
    return ends_ok and starts_ok


_BUILT: dict[str, Any] = {}


def _build_datasets(cfg: dict[str, Any], cache_dir: Path) -> tuple[Any, list[int]]:
    """train/validation/test as ``MegatronGPTModel.build_train_valid_test_datasets`` builds them (mcore path)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    model, trainer, data = cfg["model"], cfg["trainer"], cfg["model"]["data"]
    max_steps, gbs = trainer["max_steps"], model["global_batch_size"]
    eval_iters = (max_steps // trainer["val_check_interval"] + 1) * trainer["limit_val_batches"]
    num_samples = [max_steps * gbs, eval_iters * gbs, trainer["limit_test_batches"] * gbs]
    key = json.dumps([data, num_samples, model["seed"], model["tokenizer"]], sort_keys=True)
    if key not in _BUILT:
        kwargs = {
            "random_seed": model["seed"], "sequence_length": data["seq_length"], "path_to_cache": str(cache_dir),
            "tokenizer": _nemo_tokenizer(model["tokenizer"]),
            "reset_position_ids": data.get("reset_position_ids", False),
            "reset_attention_mask": data.get("reset_attention_mask", False),
            "eod_mask_loss": data.get("eod_mask_loss", False),
            "create_attention_mask": not model.get("get_attention_mask_from_fusion", True),
            "mmap_bin_files": data.get("mmap_bin_files", True),
            "drop_last_partial_validation_sequence": data.get("validation_drop_last", True),
            "num_dataset_builder_threads": data.get("num_dataset_builder_threads", 1),
            "add_extra_token_to_sequence": not data.get("no_seqlen_plus_one_input_tokens", False),
            "blend_per_split": [get_blend_from_list(data["data_prefix"][split]) for split in SPLITS],
        }  # fmt: skip
        builder = BlendedMegatronDatasetBuilder(GPTDataset, num_samples, lambda: True, GPTDatasetConfig(**kwargs))
        _BUILT[key] = builder.build()
    return _BUILT[key], num_samples


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group: megatron-core's BlendedDataset asks for the rank when it writes its cache, as
    every rank of a NeMo run has one."""
    import torch.distributed as dist

    require_nemo()
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("process_group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_e_megatron_datasets_sample_our_documents_in_the_blend(request, tmp_path_factory, process_group,
                                                                profile) -> None:
    plan, found = profile_case(request, profile)
    cfg = _model_cfg(found, profile)
    datasets, num_samples = _build_datasets(cfg, tmp_path_factory.mktemp("index_mapping"))
    seq = cfg["model"]["data"]["seq_length"]
    model_path = cfg["model"]["tokenizer"]["model"]
    eod = read_data_record(plan.settings.domain_data)["eod_id"]
    ours = {name: _documents(prefix, model_path) for name, prefix in
            (("domain", plan.settings.domain_data), ("general", plan.settings.general_data))}
    rng = np.random.default_rng(0)
    for split, dataset, wanted in zip(SPLITS, datasets, num_samples):
        assert len(dataset) >= wanted, (split, len(dataset), wanted)
        weights = [float(w) for w in plan.blend[split][0::2]]
        counts = np.bincount(dataset.dataset_index, minlength=len(weights))
        assert np.all(np.abs(counts - np.asarray(weights) * len(dataset)) <= 1 + 0.001 * len(dataset)), counts
        names = ["domain", "general"][: len(weights)]
        for index in sorted({0, len(dataset) - 1, *rng.integers(0, len(dataset), 100).tolist()}):
            sample = dataset[index]
            window = np.concatenate([sample["tokens"], sample["labels"][-1:]]).astype(np.int64)
            assert len(window) == seq + 1 and np.array_equal(sample["tokens"][1:], sample["labels"][:-1])
            name = names[dataset.dataset_index[index]]
            assert _is_window_of(window, ours[name][split], eod), (split, name, index)
        assert not _is_window_of(window[::-1].copy(), ours[name][split], eod)  # the check can fail


# --- (f) NeMo's own preprocessing --------------------------------------------------------------------------


def _jsonl(sources: list[Path], out: Path) -> Path:
    """The documents of ``sources``, then one long document joining them all (megabytes of text)."""
    texts = [doc.text for source in sources for doc in iter_documents(source)]
    with out.open("w", encoding="utf-8") as handle:
        for text in [*texts, "\n\n".join(texts)]:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return out


def _tokenizer_inputs(request, tmp_path_factory) -> list[tuple[str, Path, Path]]:
    """(name, tokenizer folder, JSONL): tiny's adapted tokenizer on the embedded sample, and where ../shared has
    them, Llama 2's tokenizer on the shared held-out text; each JSONL ends with one document of all the others."""
    tiny = tiny_artifacts(tmp_path_factory.getbasetemp())
    work = tmp_path_factory.mktemp("preprocess_inputs")
    cases = [("tiny", tiny["tokenizer"], _jsonl([tiny["domain_jsonl"], tiny["general_jsonl"]], work / "tiny.jsonl"))]
    try:
        llama2 = request.getfixturevalue("llama2_tokenizer")
        shared = request.getfixturevalue("shared_data")
    except pytest.skip.Exception:
        return cases
    folder = work / "llama2"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(llama2.read_bytes())
    return [*cases, ("llama2", folder, _jsonl([shared / "heldout"], work / "llama2.jsonl"))]


def test_f_nemo_preprocessing_writes_our_bytes(request, tmp_path_factory, tmp_path) -> None:
    """Our data stage (one split: 100/0/0) and NeMo's script, same JSONL and tokenizer: the same .bin/.idx bytes."""
    require_nemo()
    for name, tokenizer, jsonl in _tokenizer_inputs(request, tmp_path_factory):
        ours, nemo = tmp_path / f"ours_{name}", tmp_path / f"nemo_{name}"
        build_megatron_data(DataConfig(tokenizer=tokenizer, input=jsonl, output_prefix=ours,
                                       split_percent=(100.0, 0.0, 0.0), workers=1))
        command = [sys.executable, str(PREPROCESS), f"--input={jsonl}", "--json-keys=text",
                   "--tokenizer-library=sentencepiece", f"--tokenizer-model={tokenizer / 'tokenizer.model'}",
                   "--dataset-impl=mmap", "--append-eod", f"--output-prefix={nemo}", "--workers=1"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        for suffix in (".bin", ".idx"):
            mine, theirs = Path(f"{ours}_train_text_document{suffix}"), Path(f"{nemo}_text_document{suffix}")
            assert mine.stat().st_size > 0 and mine.read_bytes() == theirs.read_bytes(), (name, suffix)
