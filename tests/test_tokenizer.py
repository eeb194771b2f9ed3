"""The tokenizer stage on the real Llama 2 tokenizer and the real corpora in ../shared."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizer_golden as golden

from dapt.cli import main as cli
from dapt.corpus import load_corpus, mask_blobs, mask_blobs_by_line
from dapt.tokenizer import (
    CONTROL,
    DOMAIN_TOKENS_FILE,
    LLAMA2_TRAINER_SETTINGS,
    NORMAL,
    USER_DEFINED,
    ChunkEncoder,
    guided_bpe,
    hf_tokenizer_files,
    load_proto,
    processor,
)
from dapt.tokenizer.candidates import general_document_frequency
from dapt.tokenizer.chipnemo import cumulative_cut
from dapt.tokenizer.domain_tokenizer import TrainingLines, _training_lines


def _run(shared_data: Path, llama2_tokenizer: Path, output: Path, *extra: str) -> int:
    return cli([
        "tokenizer", "--base-tokenizer", str(llama2_tokenizer),
        "--domain-data", str(shared_data / "domain"), "--general-data", str(shared_data / "general"),
        "--heldout-domain", str(shared_data / "heldout" / "domain_heldout.jsonl"),
        "--heldout-general", str(shared_data / "heldout" / "general_heldout.jsonl"),
        "--domain-vocab-size", "8000", "--output", str(output), *extra,
    ])


def _shared_case(method: str, shared_data: Path, out: Path) -> Path:
    """One of the ../shared cases of tokenizer_golden.py (Llama 2, domain vocabulary 8,000, cap 1,500)."""
    roots = golden.shared_inputs(shared_data.parent)
    assert cli(golden.tokenizer_arguments(roots, method, golden.SHARED_OPTIONS, out)) == 0
    return out


@pytest.fixture(scope="module")
def guided(shared_data: Path, llama2_tokenizer: Path, tmp_path_factory) -> Path:
    return _shared_case("guided-bpe", shared_data, tmp_path_factory.mktemp("guided") / "tok")


@pytest.fixture(scope="module")
def chipnemo(shared_data: Path, llama2_tokenizer: Path, tmp_path_factory) -> Path:
    return _shared_case("chipnemo", shared_data, tmp_path_factory.mktemp("chipnemo") / "tok")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """The tiny profile's inputs (embedded sample, miniature base) and both methods' folders at its values."""
    folder = tmp_path_factory.mktemp("tiny")
    roots = golden.tiny_inputs(folder, cli)
    outputs = {}
    for method in golden.METHODS:
        outputs[method] = folder / method
        assert cli(golden.tokenizer_arguments(roots, method, golden.TINY_OPTIONS, outputs[method])) == 0
    return roots, outputs


@pytest.mark.parametrize("case", [f"{suite}-{method}" for suite in ("tiny", "shared") for method in golden.METHODS])
def test_outputs_equal_the_recorded_pre_split_outputs(case: str, request) -> None:
    """tokenizer.model, the HF files, domain_tokens.json and report.json (timings aside) are byte for byte those
    the code before the package split wrote on the same inputs with the same library versions."""
    suite, method = case.split("-", 1)
    if suite == "tiny":
        roots, outputs = request.getfixturevalue("tiny_runs")
        folder = outputs[method]
    else:
        folder = request.getfixturevalue("guided" if method == "guided-bpe" else "chipnemo")
        roots = golden.shared_inputs(request.getfixturevalue("shared_data").parent)
    inputs, digests = golden.case_fingerprints(suite, roots, folder)
    record, why = golden.matching_record(case, golden.library_versions(), inputs)
    if record is None:
        pytest.skip(why)
    assert digests == record["outputs"], f"{case}: outputs differ from those of commit {record['commit']}"


def test_trainer_settings_are_llama2s(llama2_tokenizer: Path) -> None:
    spec = load_proto(llama2_tokenizer).trainer_spec
    normalizer = load_proto(llama2_tokenizer).normalizer_spec
    for key, value in LLAMA2_TRAINER_SETTINGS.items():
        if key == "model_type":
            assert spec.model_type == spec.BPE
        elif key == "normalization_rule_name":
            assert normalizer.name == value
        elif key in ("add_dummy_prefix", "remove_extra_whitespaces"):
            assert getattr(normalizer, key) == value, key
        else:
            assert getattr(spec, key) == pytest.approx(value), key


def test_base_pieces_unchanged(guided: Path, llama2_tokenizer: Path) -> None:
    base, adapted = load_proto(llama2_tokenizer), load_proto(guided)
    assert len(adapted.pieces) > len(base.pieces)
    for old, new in zip(base.pieces, adapted.pieces):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type)
    assert base.trainer_spec == adapted.trainer_spec and base.normalizer_spec == adapted.normalizer_spec


def test_guided_bpe_properties(guided: Path, llama2_tokenizer: Path) -> None:
    report = json.loads((guided / "report.json").read_text())
    corpora = report["corpora"]
    assert report["added_tokens"] <= 1500
    # (b) no general document gets longer, (d) exact round trips, HF == SentencePiece
    for name in ("general_train", "general_heldout", "domain_train", "domain_heldout"):
        assert corpora[name]["documents_longer"] == 0, name
    assert abs(corpora["general_heldout"]["change_percent"]) < 0.5
    assert corpora["domain_heldout"]["change_percent"] < -15
    for name in ("domain_heldout", "general_heldout"):
        assert corpora[name]["round_trip_failures"] == []
        assert report["hf_agreement"][name]["differing"] == 0
    # (c) every added token reachable
    assert report["reachability"]["reachable"] == report["added_tokens"]
    assert report["reachability"]["unreachable"] == []
    # padding: a multiple of 128 x 8 with at least 3 reserved tokens
    assert report["vocab_size"] % 1024 == 0 and report["reserved_tokens"] >= 3


def test_added_pieces_are_normal_and_ordered_below_base(guided: Path, llama2_tokenizer: Path) -> None:
    base, adapted = load_proto(llama2_tokenizer), load_proto(guided)
    tokens = json.loads((guided / DOMAIN_TOKENS_FILE).read_text())
    floor = min(p.score for p in base.pieces)
    added = [t for t in tokens["tokens"] if t["kind"] == "domain"]
    reserved = [t for t in tokens["tokens"] if t["kind"] == "reserved"]
    assert tokens["base_vocab_size"] == len(base.pieces) and tokens["vocab_size"] == len(adapted.pieces)
    scores = [adapted.pieces[t["id"]].score for t in added]
    assert all(adapted.pieces[t["id"]].type == NORMAL and adapted.pieces[t["id"]].piece == t["token"] for t in added)
    assert max(scores) < floor and all(a > b for a, b in zip(scores, scores[1:]))
    assert all(adapted.pieces[t["id"]].type == CONTROL for t in reserved)
    assert not any("\n" in t["token"] or "\t" in t["token"] for t in added)


def test_fast_tokenizer_matches_sentencepiece_on_held_out(guided: Path, shared_data: Path) -> None:
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(guided))
    sp = spm.SentencePieceProcessor(model_file=str(guided / "tokenizer.model"))
    texts = [d.text for d in load_corpus(shared_data / "heldout", "heldout").documents]
    assert fast(texts, add_special_tokens=False)["input_ids"] == sp.encode(texts)
    assert len(fast) == sp.get_piece_size()


@pytest.mark.parametrize("method", ["guided", "chipnemo"])
def test_hf_files_equal_transformers_own_conversion(method: str, request, tmp_path: Path) -> None:
    """The stage writes the HF files itself (no transformers import); they hold what transformers converts."""
    import transformers
    from packaging.version import Version
    from transformers import LlamaTokenizerFast

    folder = request.getfixturevalue(method)
    ours = hf_tokenizer_files(load_proto(folder))
    LlamaTokenizerFast(vocab_file=str(folder / "tokenizer.model"), legacy=False, add_prefix_space=True,
                       from_slow=True).save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in theirs["model"]["merges"]]
    assert theirs["model"]["vocab"] == ours["tokenizer.json"]["model"]["vocab"]
    if Version(transformers.__version__) < Version("4.41"):
        # 4.40 orders the splits of one piece by the parts' ids (the ranks that matter are the pieces' scores)
        # and leaves control and user-defined pieces out of added_tokens; the stage writes the newer form
        assert sorted(merges) == sorted(ours["tokenizer.json"]["model"]["merges"])
        return
    assert merges == ours["tokenizer.json"]["model"]["merges"]
    for key in ("added_tokens", "post_processor", "decoder"):
        assert theirs[key] == ours["tokenizer.json"][key], key
    assert {k: v for k, v in theirs["model"].items() if k != "merges"} == \
        {k: v for k, v in ours["tokenizer.json"]["model"].items() if k != "merges"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for key in ("added_tokens_decoder", "bos_token", "eos_token", "unk_token", "add_bos_token", "add_eos_token"):
        assert config[key] == ours["tokenizer_config.json"][key], key


def test_autotokenizer_gives_the_reports_fast_tokenizer_ids(chipnemo: Path, shared_data: Path) -> None:
    """The report's HF check runs tokenizer.json with tokenizers; AutoTokenizer gives the same ids."""
    import tokenizers
    from transformers import AutoTokenizer

    texts = [d.text for d in load_corpus(shared_data / "heldout", "heldout").documents]
    engine = tokenizers.Tokenizer.from_file(str(chipnemo / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(chipnemo))
    assert auto(texts, add_special_tokens=False)["input_ids"] == [e.ids for e in engine.encode_batch(
        texts, add_special_tokens=False)]
    report = json.loads((chipnemo / "report.json").read_text())["hf_agreement"]
    assert report["domain_heldout"]["differing"] > 0  # USER_DEFINED pieces: the measured defect


def test_chipnemo_recipe_is_the_fixed_original(chipnemo: Path, llama2_tokenizer: Path) -> None:
    report = json.loads((chipnemo / "report.json").read_text())
    adapted = load_proto(chipnemo)
    first = report["base_vocab_size"]
    added = adapted.pieces[first:first + report["added_tokens"]]
    assert all(p.type == USER_DEFINED for p in added)
    assert all(any(c.isalpha() for c in p.piece) for p in added)
    # the known defect of USER_DEFINED pieces, measured rather than hidden
    assert report["corpora"]["domain_heldout"]["change_percent"] < 0
    assert report["corpora"]["general_train"]["documents_longer"] > 0


def test_default_method_beats_chipnemo(guided: Path, chipnemo: Path) -> None:
    ours = json.loads((guided / "report.json").read_text())["corpora"]
    theirs = json.loads((chipnemo / "report.json").read_text())["corpora"]
    assert ours["domain_heldout"]["change_percent"] < theirs["domain_heldout"]["change_percent"]
    assert ours["general_heldout"]["documents_longer"] <= theirs["general_heldout"]["documents_longer"]


def test_rerun_with_other_parameters_replaces_the_folder(guided: Path, shared_data: Path, llama2_tokenizer: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "tok"
    shutil.copytree(guided, out)
    small = ["--domain-data", str(shared_data / "heldout" / "domain_heldout.jsonl"),
             "--general-data", str(shared_data / "heldout" / "general_heldout.jsonl"), "--domain-vocab-size", "2000"]
    assert _run(shared_data, llama2_tokenizer, out, "--max-added-tokens", "300", *small) == 0
    adapted = load_proto(out)
    pieces = [p.piece for p in adapted.pieces]
    assert len(pieces) == len(set(pieces))
    report = json.loads((out / "report.json").read_text())
    assert report["added_tokens"] <= 300
    assert json.loads((out / "manifest.json").read_text())["parameters"]["max_added_tokens"] == 300
    assert not list(tmp_path.glob(".tok.*"))


def test_cumulative_cut() -> None:
    assert cumulative_cut([50, 30, 10, 5, 3, 2], 0.98) == 5
    assert cumulative_cut([50, 30, 10, 5, 3, 2], 0.5) == 1
    assert cumulative_cut([1] * 13, 0.98) == 13
    assert cumulative_cut([10, 10, 10], 1.0) == 3
    assert cumulative_cut([], 0.98) == 0


def test_general_document_frequency_is_a_substring_count(shared_data: Path) -> None:
    general = load_corpus(shared_data / "general", "general")
    general.documents = general.documents[:60]
    pieces = ["▁the", "ff", "▁Alice", "▁always_ff", "ing▁"]
    expected = Counter()
    for doc in general.documents:
        normalised = "▁" + doc.text.replace(" ", "▁")
        expected.update(p for p in pieces if p in normalised)
    assert general_document_frequency(pieces, general) == expected


def test_learn_merges_on_a_toy_corpus() -> None:
    domain = Counter({("▁a", "l", "w", "a", "y", "s"): 10, ("▁r", "e", "g"): 6, ("1", "2"): 9})
    general = Counter({("▁r", "e", "g"): 5})
    vocab = {"▁a", "l", "w", "a", "y", "s", "▁r", "e", "g", "1", "2"}
    result = guided_bpe.learn_merges(guided_bpe.pair_statistics(domain, general), vocab, max_merges=10,
                                     min_domain_count=2, progress=False)
    pieces = [m.piece for m in result.merges]
    assert pieces[-1] == "▁always" and "lw" in pieces or "al" in "".join(pieces)
    assert "12" not in pieces  # digits stay split
    assert "eg" not in pieces and "▁re" not in pieces  # general use outweighs domain use (6 - 4 x 5 < 0)
    kept = guided_bpe.select_by_use(result, 1.0)
    assert kept[-1].piece == "▁always" and len(kept) == len(result.merges)


def _same_outputs(first: Path, second: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.json", "domain_tokenizer.model", DOMAIN_TOKENS_FILE):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    reports = [json.loads((folder / "report.json").read_text()) for folder in (first, second)]
    for report in reports:
        del report["seconds"], report["cpu_seconds"], report["selection"]["bpe_seconds"]
    assert reports[0] == reports[1]


def test_outputs_do_not_depend_on_the_number_of_workers(shared_data: Path, llama2_tokenizer: Path,
                                                         tmp_path: Path) -> None:
    """One worker (everything in this process) and three (passes on two while the third trains)."""
    small = ["--domain-data", str(shared_data / "heldout" / "domain_heldout.jsonl"),
             "--general-data", str(shared_data / "heldout" / "general_heldout.jsonl"), "--domain-vocab-size", "2000",
             "--max-added-tokens", "200"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert _run(shared_data, llama2_tokenizer, first, *small, "--workers", "1") == 0
    assert _run(shared_data, llama2_tokenizer, second, *small, "--workers", "3") == 0
    _same_outputs(first, second)


def _one_document(source: Path, target: Path) -> Path:
    """All documents of ``source`` (a JSONL file) joined into one, in a JSONL file of its own."""
    texts = [d.text for d in load_corpus(source, "joined").documents]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"text": "\n\n".join(texts), "file_type": "joined"}) + "\n", encoding="utf-8")
    return target


def test_one_long_document_gives_the_same_tokenizer_taken_in_pieces(shared_data: Path, llama2_tokenizer: Path,
                                                                   tmp_path: Path, monkeypatch) -> None:
    """The held-out files as one document each (700 KB and 400 KB): measured whole (they are shorter than
    SEGMENT_CHARS) and in pieces of 20,000 characters in this process (INLINE_CHARS lowered), the stage's
    outputs are the same: the pieces give the ids, word counts and document counts of the whole."""
    from dapt.tokenizer import chunked_encoding, workers

    held = shared_data / "heldout"
    options = ["--domain-data", str(_one_document(held / "domain_heldout.jsonl", tmp_path / "d" / "one.jsonl")),
               "--general-data", str(_one_document(held / "general_heldout.jsonl", tmp_path / "g" / "one.jsonl")),
               "--domain-vocab-size", "2000", "--max-added-tokens", "300", "--workers", "2"]
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert _run(shared_data, llama2_tokenizer, whole, *options) == 0
    monkeypatch.setattr(chunked_encoding, "SEGMENT_CHARS", 20_000)
    monkeypatch.setattr(workers, "INLINE_CHARS", 100_000)
    assert _run(shared_data, llama2_tokenizer, pieces, *options) == 0
    _same_outputs(whole, pieces)
    assert json.loads((whole / "report.json").read_text())["added_tokens"] > 100


def test_pieces_of_a_long_document_give_its_ids(shared_data: Path, llama2_tokenizer: Path, monkeypatch) -> None:
    """Blob-masked pieces cut at chunk starts, encoded one by one, give SentencePiece's ids of the whole
    masked document; the pieces' general-document counts are the whole's, even for pieces spanning a cut."""
    from dapt.tokenizer import chunked_encoding
    from dapt.tokenizer.candidates import DocumentFrequency
    from dapt.tokenizer.corpus_passes import measured_pieces

    texts = [d.text for d in load_corpus(shared_data / "heldout" / "domain_heldout.jsonl", "d").documents]
    text = "\n\n".join(texts) + "  end 0xDEADBEEF01  with   spaces  \n  and\n\n  dump " + "ab " * 20
    monkeypatch.setattr(chunked_encoding, "SEGMENT_CHARS", 5_000)
    pieces = list(measured_pieces(text, mask=True))
    masked = mask_blobs_by_line(text)
    assert len(pieces) > 50 and "".join(pieces) == masked
    base = load_proto(llama2_tokenizer)
    encoder = ChunkEncoder(base)
    ids = []
    for number, piece in enumerate(pieces):
        units = encoder.units(piece, first=number == 0)
        encoder.prepare(units)
        ids.extend(encoder.ids(units))
    assert ids == processor(base).encode(masked)
    spanning = [masked[cut - 3:cut + 4].replace(" ", "▁") for cut in (5_000, 10_000, 15_000)]
    counter = DocumentFrequency(["▁module", "▁endmodule", "ab▁ab", *spanning])
    counter.add(text)
    whole = general_document_frequency(["▁module", "▁endmodule", "ab▁ab", *spanning], [text])
    assert counter.counts == whole and all(whole[p] == 1 for p in spanning)


def test_defaults_are_the_notebooks_tiny_values() -> None:
    """`python -m dapt tokenizer` with no options does what the notebook does on the tiny profile.

    The notebook leaves its size parameters at None and builds its config with ``config_for(TokenizerConfig,
    PROFILE, ...)``, so both take the profile's values from one place; under a GPU profile both get the full sizes.
    """
    from dapt.cli import parse_stage
    from dapt.config import REPO_ROOT, config_for
    from dapt.tokenizer import TokenizerConfig

    notebook = "".join("".join(cell["source"]) for cell in json.loads(
        (REPO_ROOT / "code" / "custom_tokenization.ipynb").read_text())["cells"])
    assert "DOMAIN_VOCAB_SIZE = None" in notebook and "MAX_ADDED_TOKENS = None" in notebook
    assert "config_for(\n        TokenizerConfig, PROFILE," in notebook
    sizes = ("domain_vocab_size", "max_added_tokens")
    for profile, expected in (("tiny", (4000, 1024)), ("llama2-7b", (16000, None))):
        notebook_config = config_for(TokenizerConfig, profile)
        cli_config, _ = parse_stage("tokenizer", ["--profile", profile])
        assert tuple(getattr(notebook_config, name) for name in sizes) == expected
        assert tuple(getattr(cli_config, name) for name in sizes) == expected
    assert tuple(getattr(TokenizerConfig(), name) for name in sizes) == (4000, 1024)


@pytest.mark.parametrize(("option", "value"), [
    ("--workers", "-1"), ("--domain-vocab-size", "10"), ("--freq-threshold", "0"), ("--freq-threshold", "1.5"),
    ("--max-added-tokens", "0"), ("--max-tensor-parallel", "0"), ("--occur-limit", "-1"), ("--min-reserved", "-1"),
    ("--max-training-lines", "0"), ("--general-penalty", "nan"), ("--guide-bonus", "-1.0"),
    ("--min-domain-count", "-2"),
])
def test_numbers_that_cannot_work_are_refused(option: str, value: str, tmp_path: Path, capsys) -> None:
    """Exit 2 before any work, one line naming the option and the value given, no folder written."""
    out = tmp_path / "tok"
    assert cli(["tokenizer", option, value, "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"{option} {value}" in error and "must be" in error and "Traceback" not in error
    assert not out.exists()


def test_base_tokenizer_refuses_a_vocabulary_too_small(tmp_path: Path, capsys) -> None:
    assert cli(["base-tokenizer", "--vocab-size", "0", "--output", str(tmp_path / "base")]) == 2
    assert "--vocab-size 0: must be at least 260" in capsys.readouterr().err


@pytest.mark.parametrize("corpus", ["domain", "general"])
def test_a_lone_surrogate_is_refused_naming_file_and_line(corpus: str, shared_data: Path, llama2_tokenizer: Path,
                                                         tmp_path: Path, capsys) -> None:
    """A record holding "\\ud800" (valid JSON, not encodable text): exit 2 and a message naming the file and line.

    The refusal belongs to corpus reading (dapt.corpus, for every stage); this checks the tokenizer stage gets it."""

    bad = tmp_path / corpus / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine text"}\n{"text": "abc \\ud800 def"}\n', encoding="utf-8")
    data = {"domain": shared_data / "heldout" / "domain_heldout.jsonl",
            "general": shared_data / "heldout" / "general_heldout.jsonl", corpus: bad.parent}
    out = tmp_path / "tok"
    code = cli(["tokenizer", "--base-tokenizer", str(llama2_tokenizer), "--domain-data", str(data["domain"]),
                "--general-data", str(data["general"]), "--domain-vocab-size", "2000", "--output", str(out)])
    error = capsys.readouterr().err
    assert code == 2 and f"{bad}:2" in error and "Traceback" not in error
    assert not out.exists() and not list(tmp_path.glob(".tok.*"))


def test_the_cumulative_use_plots_account_adds_up() -> None:
    """The note on cumulative_use.png: chosen + building blocks - pruned = added; the cap is named."""
    from dapt.tokenizer.candidates import Selection
    from dapt.tokenizer.plots import selection_account

    ranking = [(f"p{k}", 100 - k) for k in range(90)]
    selection = Selection(pieces=[f"p{k}" for k in range(60)] + ["b1", "b2", "unused"], piece_type=NORMAL,
                          domain_use={}, details={"merges_learned": 64}, ranking=ranking,
                          chosen=[f"p{k}" for k in range(60)], capped=False)
    added = [p for p in selection.pieces if p != "unused"]
    note = "\n".join(selection_account(selection, added, 0.98, 64, "guided-bpe"))
    assert "64 merges learned (stopped at the cap, --max-added-tokens 64)" in note
    assert "90 of them are used" in note and "60 kept for their own use" in note
    assert "+ 3 building blocks" in note and "- 1 never produced" in note and "= 62 tokens added" in note
    chipnemo = Selection(pieces=["a", "b"], piece_type=USER_DEFINED, domain_use={}, details={},
                         ranking=[("a", 50), ("b", 30), ("c", 20)], chosen=["a", "b"], capped=True)
    note = "\n".join(selection_account(chipnemo, ["a", "b"], 0.98, 2, "chipnemo"))
    assert "the 3 most used reach 98%" in note and "capped at 2 (--max-added-tokens)" in note


def test_fast_blob_masking_equals_the_pattern(shared_data: Path) -> None:
    texts = [d.text for d in load_corpus(shared_data / "heldout", "heldout").documents]
    texts += ["x\n'hDEADBEEF00\n", "é 0x12345678 ü\n\n" + "Ab1" * 10, "é" * 5 + "0101010101010101_01",
              "ab cd ef 01 02 03 04 05 06 07 08 09 0a 0b 0c", "plain text\nwithout blobs"]
    masked = [mask_blobs(t) for t in texts]
    assert sum(m != t for m, t in zip(masked, texts)) > 5
    assert [mask_blobs_by_line(t) for t in texts] == masked


def test_training_line_sample_is_capped_and_order_free() -> None:
    docs = [f"line {i}\n\nrepeat\nother {i % 7}" for i in range(300)]
    small, shuffled, reversed_ = TrainingLines(10_000), TrainingLines(250), TrainingLines(250)
    for doc in docs:
        small.add(doc)
        shuffled.add(doc)
    for doc in reversed(docs):
        reversed_.add(doc)
    assert small.result() == _training_lines(docs)  # under the cap: every line, in order
    assert len(shuffled.result()) == 250 and shuffled.seen == 900
    assert shuffled.result() == reversed_.result()


def test_chunked_word_counts_equal_whole_documents(shared_data: Path, llama2_tokenizer: Path) -> None:
    base = load_proto(llama2_tokenizer)
    texts = [d.text for d in load_corpus(shared_data / "heldout" / "domain_heldout.jsonl", "d").documents][:20]
    texts.append("tab\there ünïcödé 𝔘 and\u3000ideographic space  two  spaces")
    table = [p.piece for p in base.pieces]
    vocab = set(table)
    whole = guided_bpe.count_words([[table[i] for i in ids] for ids in processor(base).encode(texts)], vocab)
    encoder = ChunkEncoder(base, max_cached=50)  # a tiny cache: emptied between batches
    fast = guided_bpe.WordCounter(table)
    for text in texts:
        units = encoder.units(text)
        encoder.prepare(units)
        for unit in units:
            fast.add(encoder.cache[unit], 2)
    # chunk by chunk, the stage's counter keeps the words BPE can merge (2+ symbols), byte-fallback text included
    assert fast.counts == Counter({word: 2 * n for word, n in whole.items() if len(word) > 1})
    assert any(not fast.byte_ids.isdisjoint(encoder.cache[u]) for u in encoder.units(texts[-1]))  # slow path ran


def test_leaving_out_general_words_that_cannot_change_keeps_the_merges(shared_data: Path,
                                                                         llama2_tokenizer: Path) -> None:
    base = load_proto(llama2_tokenizer)
    table = [p.piece for p in base.pieces]
    words = {}
    for name in ("domain", "general"):
        counter = guided_bpe.WordCounter(table)
        texts = [d.text for d in load_corpus(shared_data / "heldout" / f"{name}_heldout.jsonl", name).documents]
        for ids in processor(base).encode(texts):
            counter.add(ids, 1)
        words[name] = counter.counts
    filtered = guided_bpe.pair_statistics(words["domain"], words["general"])
    every = list(set(words["domain"]) | set(words["general"]))
    unfiltered = guided_bpe.PairStats([list(w) for w in every], [words["domain"].get(w, 0) for w in every],
                                      [words["general"].get(w, 0) for w in every])
    assert len(filtered.words) < len(unfiltered.words)
    runs = [guided_bpe.learn_merges(stats, set(table), max_merges=300, general_penalty=4.0,
                                    min_domain_count=1, progress=False) for stats in (filtered, unfiltered)]
    assert runs[0].merges == runs[1].merges and runs[0].final_use == runs[1].final_use


def test_tokenizer_json_is_readable_by_older_tokenizers(guided: Path) -> None:
    """Merges as "left right" strings: tokenizers 0.19 (NeMo 24.07) cannot read the newer pair form."""
    merges = json.loads((guided / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
