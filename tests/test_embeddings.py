"""The embeddings stage on a real model (stories260K from llama2.c) and on a sharded bf16 checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from adapted_tokenizer_fixture import build_adapted_tokenizer, frequent_word_pieces
from safetensors.torch import load_file

from dapt.artifacts import StageError
from dapt.basemodel import BaseModelConfig, build_base_model
from dapt.cli import main
from dapt.compat import sentencepiece_model_pb2
from dapt.corpus import iter_documents
from dapt.embeddings import EMBED, LM_HEAD, EmbeddingsConfig, EmbeddingsError, extend_embeddings
from dapt.embeddings.init_rules import column_mean_and_std, subtoken_encoder, subtoken_ids


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def stories(stories260k: Path, work: Path) -> Path:
    """stories260K as an HF folder (tied embeddings, lossless tok512)."""
    config = BaseModelConfig(
        output=work / "stories",
        llama2c_checkpoint=stories260k / "stories260K.bin",
        llama2c_tokenizer=stories260k / "tok512.model",
    )
    return build_base_model(config)


@pytest.fixture(scope="module")
def domain_texts(shared_data: Path) -> list[str]:
    texts: list[str] = []
    for path in sorted((shared_data / "domain").glob("*.jsonl")):
        texts.extend(doc.text for doc, _ in zip(iter_documents(path), range(60), strict=False))
    return texts


@pytest.fixture(scope="module")
def adapted(stories: Path, domain_texts: list[str], work: Path) -> Path:
    """tok512 + 500 frequent domain pieces + 12 reserved pieces (1,024 in all)."""
    pieces = frequent_word_pieces(stories / "tokenizer.model", domain_texts, 500)
    return build_adapted_tokenizer(stories / "tokenizer.model", pieces, work / "adapted")


@pytest.fixture(scope="module")
def domain_ids(adapted: Path) -> list[int]:
    tokens = json.loads((adapted / "domain_tokens.json").read_text())["tokens"]
    return [t["id"] for t in tokens if t["kind"] == "domain"]


@pytest.fixture(scope="module")
def heldout(shared_data: Path) -> Path:
    return shared_data / "heldout" / "domain_heldout.jsonl"


@pytest.fixture(scope="module")
def tied_mean(stories: Path, adapted: Path, heldout: Path, work: Path) -> Path:
    config = EmbeddingsConfig(
        base_model=stories,
        tokenizer=adapted,
        output=work / "tied_mean",
        output_init="mean",
        heldout=heldout,
        sanity_documents=2,
    )
    return extend_embeddings(config)


def base_text_ids(folder: Path, heldout: Path, count: int = 200) -> torch.Tensor:
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = next(iter_documents(heldout)).text
    return torch.tensor([([sp.bos_id()] + sp.encode(text))[:count]])


def original_logits_diff(base: Path, extended: Path, ids: torch.Tensor) -> float:
    from transformers import LlamaForCausalLM

    old_model = LlamaForCausalLM.from_pretrained(str(base)).float().eval()
    new_model = LlamaForCausalLM.from_pretrained(str(extended)).float().eval()
    with torch.no_grad():
        old, new = old_model(input_ids=ids).logits, new_model(input_ids=ids).logits
    assert new.shape[-1] == new_model.config.vocab_size > old.shape[-1]
    return float((new[..., : old.shape[-1]] - old).abs().max())


def test_tied_mean_extension_keeps_original_rows_and_logits(
    stories: Path, adapted: Path, tied_mean: Path, heldout: Path
) -> None:
    from transformers import AutoTokenizer

    old, new = load_file(str(stories / "model.safetensors")), load_file(str(tied_mean / "model.safetensors"))
    assert LM_HEAD not in new and new[EMBED].shape == (1024, 64) and new[EMBED].dtype == old[EMBED].dtype
    assert torch.equal(new[EMBED][:512], old[EMBED])  # bit-identical original rows
    assert all(torch.equal(new[k], old[k]) for k in old if k != EMBED)
    assert original_logits_diff(stories, tied_mean, base_text_ids(stories, heldout)) == 0.0

    config = json.loads((tied_mean / "config.json").read_text())
    assert config["vocab_size"] == 1024 and config["tie_word_embeddings"] is True
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "domain_tokens.json"):
        assert (tied_mean / name).read_bytes() == (adapted / name).read_bytes(), name
    assert len(AutoTokenizer.from_pretrained(str(tied_mean))) == 1024
    assert (tied_mean / "embedding_norms.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tied_mean / "report.json").read_text())
    sanity = report["sanity_check"]
    assert sanity["loads"] and sanity["original_logits_max_abs_diff"] == 0.0
    assert sanity["heldout_tokens_extended"] < sanity["heldout_tokens_base"]
    assert sanity["heldout_bits_per_byte_extended_on_base_tokens"] > sanity["heldout_bits_per_byte_base"]
    assert 0 < sanity["heldout_bits_per_byte_extended"] < 20
    assert json.loads((tied_mean / "manifest.json").read_text())["stage"] == "embeddings"


def test_mean_rows_average_the_surface_subtokens(stories: Path, adapted: Path, tied_mean: Path) -> None:
    old, new = (
        load_file(str(stories / "model.safetensors"))[EMBED],
        load_file(str(tied_mean / "model.safetensors"))[EMBED],
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((stories / "tokenizer.model").read_bytes())
    encoder = subtoken_encoder(proto)
    added = json.loads((adapted / "domain_tokens.json").read_text())["tokens"]
    base_sp = spm.SentencePieceProcessor(model_file=str(stories / "tokenizer.model"))
    bare_space = encoder.piece_to_id("\u2581")
    ours = naive = 0
    for entry in added:
        if entry["kind"] != "domain":
            continue
        ids = subtoken_ids(encoder, entry["token"])
        assert "".join(encoder.id_to_piece(i) for i in ids) == entry["token"]  # the surface, nothing added
        # "▁word" is split exactly as the base tokenizer splits the word in running text
        assert entry["token"].startswith("\u2581") and ids == base_sp.encode(entry["token"][1:])
        assert torch.allclose(new[entry["id"]], old[ids].mean(dim=0), atol=1e-7)
        ours += bare_space in ids
        naive += bare_space in base_sp.encode(entry["token"])  # the piece encoded with the dummy prefix on
    # tok512 has few "▁x" pieces, so a bare "▁" is part of its own split of some words; the naive rule
    # adds a stray one to every token
    domain = sum(e["kind"] == "domain" for e in added)
    assert naive >= 0.95 * domain and ours < naive / 3
    # a token without a leading "▁" gets no space piece at all
    assert not any(encoder.id_to_piece(i).startswith("\u2581") for i in subtoken_ids(encoder, "module"))
    reserved = [e["id"] for e in added if e["kind"] == "reserved"]
    assert len(reserved) == 1024 - 512 - domain and torch.allclose(
        new[reserved[0]], old.mean(dim=0), atol=1e-6
    )


def test_untied_zero_output_rows(
    stories: Path, adapted: Path, domain_ids: list[int], heldout: Path, work: Path
) -> None:
    out = extend_embeddings(
        EmbeddingsConfig(
            base_model=stories,
            tokenizer=adapted,
            output=work / "untied",
            untie_embeddings=True,
            sanity_check=False,
        )
    )
    old, new = load_file(str(stories / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(new[LM_HEAD][:512], old[EMBED]) and torch.equal(new[EMBED][:512], old[EMBED])
    assert not new[LM_HEAD][domain_ids].any() and new[EMBED][domain_ids].abs().sum() > 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert original_logits_diff(stories, out, base_text_ids(stories, heldout)) == 0.0


def test_zero_output_rows_on_a_tied_matrix_are_refused(stories: Path, adapted: Path, work: Path) -> None:
    with pytest.raises(EmbeddingsError, match="ties its input and output"):
        extend_embeddings(EmbeddingsConfig(base_model=stories, tokenizer=adapted, output=work / "refused"))
    assert not (work / "refused").exists()


def test_random_rows_follow_the_base_scale(
    stories: Path, adapted: Path, domain_ids: list[int], work: Path
) -> None:
    config = EmbeddingsConfig(
        base_model=stories,
        tokenizer=adapted,
        output=work / "random",
        input_init="random",
        output_init="mean",
        sanity_check=False,
    )
    out = extend_embeddings(config)
    base = load_file(str(stories / "model.safetensors"))[EMBED]
    rows = load_file(str(out / "model.safetensors"))[EMBED][domain_ids]
    assert 0.8 < float(rows.std() / base.std()) < 1.2
    again = extend_embeddings(config)  # the same run again: seeded, so the same rows
    assert torch.equal(load_file(str(again / "model.safetensors"))[EMBED][domain_ids], rows)  # seeded


# --- sharded bf16 checkpoint --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(stories: Path, work: Path) -> Path:
    """A random untied bf16 Llama with tok512's vocabulary, saved in several shards with an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
    folder = work / "sharded"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(folder), max_shard_size="60KB")
    shutil.copy(stories / "tokenizer.model", folder / "tokenizer.model")
    return folder


def test_sharded_bf16_checkpoint(
    sharded: Path, adapted: Path, domain_ids: list[int], heldout: Path, work: Path
) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    out = extend_embeddings(
        EmbeddingsConfig(
            base_model=sharded, tokenizer=adapted, output=work / "sharded_out", sanity_check=False
        )
    )
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert new_index["weight_map"] == index["weight_map"]
    changed = {index["weight_map"][EMBED], index["weight_map"][LM_HEAD]}
    total = 0
    for shard in shards:
        old, new = load_file(str(sharded / shard)), load_file(str(out / shard))
        assert old.keys() == new.keys()
        total += sum(t.numel() * t.element_size() for t in new.values())
        if shard not in changed:
            assert os.stat(sharded / shard).st_ino == os.stat(out / shard).st_ino  # hard-linked
        for name, tensor in new.items():
            assert tensor.dtype == torch.bfloat16
            if name in (EMBED, LM_HEAD):
                assert tensor.shape == (1024, 64) and torch.equal(tensor[:512], old[name])
            else:
                assert torch.equal(tensor, old[name])
    assert new_index["metadata"]["total_size"] == total
    assert not load_file(str(out / index["weight_map"][LM_HEAD]))[LM_HEAD][
        domain_ids
    ].any()  # zero output rows
    assert original_logits_diff(sharded, out, base_text_ids(sharded, heldout, 64)) == 0.0


# --- bad input ----------------------------------------------------------------------------------


def test_vocabulary_mismatch(stories: Path, adapted: Path, llama2_tokenizer: Path, work: Path) -> None:
    with pytest.raises(EmbeddingsError, match="vocabulary mismatch"):
        extend_embeddings(
            EmbeddingsConfig(
                base_model=stories,
                tokenizer=adapted,
                output=work / "x",
                base_tokenizer=llama2_tokenizer,
                output_init="mean",
            )
        )
    padded = work / "padded_config"
    shutil.copytree(stories, padded)
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": 576}))
    with pytest.raises(EmbeddingsError, match="vocabulary mismatch"):
        extend_embeddings(
            EmbeddingsConfig(base_model=padded, tokenizer=adapted, output=work / "x", output_init="mean")
        )


def test_tokenizer_that_is_not_an_extension(stories: Path, work: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((stories / "tokenizer.model").read_bytes())
    proto.pieces[300].piece, proto.pieces[301].piece = proto.pieces[301].piece, proto.pieces[300].piece
    other = work / "other_base.model"
    other.write_bytes(proto.SerializeToString())
    foreign = build_adapted_tokenizer(other, ["\u2581xyzzyq"], work / "foreign")
    with pytest.raises(EmbeddingsError, match="not an extension .* id 300"):
        extend_embeddings(
            EmbeddingsConfig(base_model=stories, tokenizer=foreign, output=work / "x", output_init="mean")
        )


def test_missing_shard(sharded: Path, adapted: Path, work: Path) -> None:
    broken = work / "broken"
    shutil.copytree(sharded, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(EmbeddingsError, match=f"shard .*{victim.name}.* is missing"):
        extend_embeddings(EmbeddingsConfig(base_model=broken, tokenizer=adapted, output=work / "x"))


def test_output_folder_holding_another_run(
    stories: Path, adapted: Path, work: Path, capsys: pytest.CaptureFixture
) -> None:
    other_run = work / "other_run"
    shutil.copytree(stories, other_run)  # a base-model stage folder
    with pytest.raises(StageError, match="already holds files not written by"):
        extend_embeddings(
            EmbeddingsConfig(
                base_model=stories,
                tokenizer=adapted,
                output=other_run,
                output_init="mean",
                sanity_check=False,
            )
        )
    assert (other_run / "model.safetensors").read_bytes() == (stories / "model.safetensors").read_bytes()
    code = main(
        [
            "embeddings",
            "--base-model",
            str(stories),
            "--tokenizer",
            str(adapted),
            "--output",
            str(stories),
            "--output-init",
            "mean",
        ]
    )
    assert code == 2 and "overlaps --base-model" in capsys.readouterr().err


def test_block_statistics_leave_a_float32_matrix_untouched() -> None:
    """Row blocks are copies: with float32 weights and several blocks, the source matrix must not change."""
    matrix = torch.randn(2500, 16, generator=torch.Generator().manual_seed(0))
    before = matrix.clone()
    mean, std = column_mean_and_std(matrix)
    assert torch.equal(matrix, before)
    assert torch.allclose(mean, before.mean(dim=0), atol=1e-5)
    assert abs(std - before.std(unbiased=False).item()) < 1e-4


# --- offline (no ../shared): a small random Llama and an adapted tokenizer built here ---------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 400-piece SentencePiece model on the general sample, a random untied Llama with that vocabulary,
    and an adapted tokenizer: the 400 pieces + frequent words of the held-out domain sample, padded to 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dapt.corpus import DEFAULT_HELDOUT, general_sample_records

    root = tmp_path_factory.mktemp("small")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(r["text"] for r in general_sample_records(150_000)),
        model_prefix=str(root / "tok"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = root / "model"
    LlamaForCausalLM(config).save_pretrained(str(model))
    shutil.copy(root / "tok.model", model / "tokenizer.model")
    texts = [doc.text for doc in iter_documents(DEFAULT_HELDOUT / "domain")]
    pieces = frequent_word_pieces(root / "tok.model", texts, 100)
    adapted = build_adapted_tokenizer(root / "tok.model", pieces, root / "adapted", multiple=128)
    return {"model": model, "tokenizer": adapted, "heldout": DEFAULT_HELDOUT / "domain", "root": root}


def run_cli(small: dict[str, Path], output: Path, *options: str) -> int:
    argv = ["embeddings", "--base-model", str(small["model"]), "--tokenizer", str(small["tokenizer"])]
    return main([*argv, "--output", str(output), "--heldout", str(small["heldout"]), "--vocab-multiple", "128",
                 *options])


def test_small_model_offline(small: dict[str, Path], tmp_path: Path) -> None:
    assert run_cli(small, tmp_path / "out", "--sanity-documents", "2") == 0
    old = load_file(str(small["model"] / "model.safetensors"))
    new = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert new[EMBED].shape == new[LM_HEAD].shape == (512, 32)
    assert torch.equal(new[EMBED][:400], old[EMBED]) and torch.equal(new[LM_HEAD][:400], old[LM_HEAD])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    sanity = report["sanity_check"]
    assert report["vocab_size"] == 512 and sanity["original_logits_max_abs_diff"] == 0.0
    # on the base model's own tokens the new rows only take probability mass away: strictly worse
    assert sanity["heldout_bits_per_byte_extended_on_base_tokens"] > sanity["heldout_bits_per_byte_base"]
    assert 0 < sanity["heldout_new_token_share"] < 1
    assert run_cli(small, tmp_path / "out", "--no-sanity-check") == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sanity_check"] == {
        "skipped": "--no-sanity-check"
    }
    assert run_cli(small, tmp_path / "out", "--sanity-max-bytes", "1000") == 0
    skipped = json.loads((tmp_path / "out" / "report.json").read_text())["sanity_check"]["skipped"]
    assert skipped.endswith("bytes) exceed --sanity-max-bytes 1000")


def test_defaults_are_the_notebooks() -> None:
    """`python -m dapt embeddings` with no options: the tiny notebook's call (vocab_multiple=128 * 8 ...)."""
    from dapt.config import CODE_DIR, DEFAULT_OUTPUTS, get_profile

    config = EmbeddingsConfig()
    assert config.vocab_multiple == 128 * get_profile("tiny").max_tensor_parallel == 1024
    assert (config.input_init, config.output_init) == ("mean", "zero")
    assert config.base_model == DEFAULT_OUTPUTS / "tiny" / "base_model"
    assert config.tokenizer == DEFAULT_OUTPUTS / "tiny" / "tokenizer"
    assert config.output == DEFAULT_OUTPUTS / "tiny" / "extended_model"
    assert config.heldout == CODE_DIR / "heldout" / "domain"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--vocab-multiple", "0"], "--vocab-multiple 0 must be at least 1"),
        (["--vocab-multiple", "-128"], "--vocab-multiple -128 must be at least 1"),
        (["--sanity-documents", "0"], "--sanity-documents 0 must be at least 1"),
        (["--sanity-max-bytes", "-1"], "--sanity-max-bytes -1 must be 0 or more"),
        (["--seed", "-1"], "--seed -1 must be from 0 to"),
    ],
)
def test_numbers_that_cannot_work_are_refused(
    small: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    assert run_cli(small, tmp_path / "out", *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_init_names_outside_the_choices_are_refused(small: dict[str, Path], tmp_path: Path) -> None:
    """From Python (no argparse choices) an unknown rule name used to fall back to `mean` silently."""
    config = EmbeddingsConfig(base_model=small["model"], tokenizer=small["tokenizer"], output=tmp_path / "o",
                              output_init="Zero", vocab_multiple=128)  # type: ignore[arg-type]
    with pytest.raises(EmbeddingsError, match="--output-init 'Zero' is not one of zero, mean"):
        extend_embeddings(config)


def _message(small: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, *options: str) -> str:
    argv = ["embeddings", "--base-model", str(small["model"]), "--tokenizer", str(small["tokenizer"]),
            "--output", str(tmp_path / "out"), "--heldout", str(small["heldout"]), "--vocab-multiple", "128"]
    assert main([*argv, *options]) == 2  # later options override the ones above
    assert not (tmp_path / "out").exists()
    return capsys.readouterr().err


def test_messages_name_the_users_value(
    small: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "missing"
    err = _message(small, tmp_path, capsys, "--base-model", str(missing))
    assert f"--base-model {missing} does not exist" in err and "pass --base-model" not in err
    err = _message(small, tmp_path, capsys, "--base-model", str(small["model"] / "model.safetensors"))
    assert "is a file, not a checkpoint folder" in err and f"its folder {small['model']} holds config.json" in err
    err = _message(small, tmp_path, capsys, "--tokenizer", str(missing))
    assert f"--tokenizer {missing} is not a folder" in err
    err = _message(small, tmp_path, capsys, "--base-tokenizer", str(missing / "tok.model"))
    assert f"--base-tokenizer {missing / 'tok.model'} does not exist" in err
    err = _message(small, tmp_path, capsys, "--heldout", str(missing))
    assert f"--heldout {missing} does not exist" in err and "--no-sanity-check" in err
    err = _message(small, tmp_path, capsys, "--vocab-multiple", "1024")
    assert "adapted vocabulary 512" in err and "--vocab-multiple 1024" in err


def test_damaged_checkpoint_files_are_clean_refusals(
    small: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small["model"], broken)
    (broken / "config.json").write_text("{not json")
    err = _message(small, tmp_path, capsys, "--base-model", str(broken))
    assert f"{broken / 'config.json'} is not valid JSON" in err
    shutil.copy(small["model"] / "config.json", broken / "config.json")
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    err = _message(small, tmp_path, capsys, "--base-model", str(broken))
    assert f"{broken / 'model.safetensors'} is truncated" in err
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       ")
    err = _message(small, tmp_path, capsys, "--base-model", str(broken))
    assert "is not a valid safetensors file (unreadable header)" in err


# --- safetensors I/O -------------------------------------------------------------------------------


def test_rewrite_safetensors_streams_old_tensors_and_writes_new_ones(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from dapt.embeddings.safetensors_io import NewTensor, read_safetensors_header, read_tensor, rewrite_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(5, 3, generator=generator).to(torch.bfloat16),
        "b": torch.randn(7, generator=generator).to(torch.float16),
        "c": torch.randn(2, 2, generator=generator),
    }
    save_file(tensors, str(tmp_path / "in.safetensors"), metadata={"format": "pt"})
    source = read_safetensors_header(tmp_path / "in.safetensors")
    assert torch.equal(read_tensor(source, "a"), tensors["a"])
    bigger = torch.cat([tensors["a"], torch.zeros(2, 3, dtype=torch.bfloat16)])
    new = {"a": NewTensor("BF16", (7, 3), lambda: bigger), "d": NewTensor("F32", (4,), lambda: torch.arange(4.0))}
    written = rewrite_safetensors(source, tmp_path / "out.safetensors", new, chunk=5)  # chunks smaller than a tensor
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["a"], bigger) and torch.equal(out["b"], tensors["b"]) and torch.equal(out["c"], tensors["c"])
    assert torch.equal(out["d"], torch.arange(4.0))
    assert written == sum(t.numel() * t.element_size() for t in out.values())
    assert read_safetensors_header(tmp_path / "out.safetensors").metadata == {"format": "pt"}
