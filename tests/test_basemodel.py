"""The base-model stage: llama2.c conversion against a reference forward; the tiny pretrained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from dapt.basemodel import BaseModelConfig, build_base_model, read_llama2c
from dapt.cli import main
from dapt.compat import sentencepiece_model_pb2
from dapt.corpus import general_sample_records
from dapt.errors import UserInputError


@pytest.fixture(scope="module")
def stories_hf(stories260k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("basemodel") / "stories"
    config = BaseModelConfig(
        output=out,
        llama2c_checkpoint=stories260k / "stories260K.bin",
        llama2c_tokenizer=stories260k / "tok512.model",
    )
    return build_base_model(config)


def reference_logits(header: dict, w: dict, tokens: list[int]) -> torch.Tensor:
    """llama2.c's forward written out plainly: interleaved rotary pairs, grouped KV heads, tied classifier."""
    t = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in w.items()}
    dim, heads, kv_heads = header["dim"], header["n_heads"], header["n_kv_heads"]
    hs, n = dim // heads, len(tokens)

    def rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * weight

    def rotate(x: torch.Tensor) -> torch.Tensor:  # x: (n, heads, hs), pairs (2i, 2i+1) within each head
        freq = 1.0 / 10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None, :]
        cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x = t["tok_embeddings"][tokens]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for layer in range(header["n_layers"]):
        xb = rmsnorm(x, t["attention_norm"][layer])
        q = rotate((xb @ t["wq"][layer].T).view(n, heads, hs))
        k = rotate((xb @ t["wk"][layer].T).view(n, kv_heads, hs)).repeat_interleave(heads // kv_heads, dim=1)
        v = (xb @ t["wv"][layer].T).view(n, kv_heads, hs).repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hs) + mask
        att = torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v).reshape(n, dim)
        x = x + att @ t["wo"][layer].T
        xb = rmsnorm(x, t["ffn_norm"][layer])
        x = x + (torch.nn.functional.silu(xb @ t["w1"][layer].T) * (xb @ t["w3"][layer].T)) @ t["w2"][layer].T
    return rmsnorm(x, t["norm"]) @ t["tok_embeddings"].T


def test_llama2c_conversion_matches_reference_forward(stories260k: Path, stories_hf: Path) -> None:
    from transformers import LlamaForCausalLM

    header, weights = read_llama2c(stories260k / "stories260K.bin")
    assert header == {
        "dim": 64,
        "hidden_dim": 172,
        "n_layers": 5,
        "n_heads": 8,
        "n_kv_heads": 4,
        "vocab_size": 512,
        "seq_len": 512,
        "shared_classifier": 1,
    }
    sp = spm.SentencePieceProcessor(model_file=str(stories_hf / "tokenizer.model"))
    tokens = [sp.bos_id()] + sp.encode("Once upon a time, a little dog found a red ball in the garden.")
    model = LlamaForCausalLM.from_pretrained(str(stories_hf)).eval()
    assert model.config.tie_word_embeddings and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([tokens])).logits[0].double()
    reference = reference_logits(header, weights, tokens)
    assert (hf - reference).abs().max().item() < 1e-4
    assert hf.abs().max().item() > 1.0  # real logits, not a degenerate all-zero model


def test_llama2c_conversion_records_float32_without_deprecation_warnings(
    stories260k: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """transformers 4.57 renamed ``torch_dtype`` to ``dtype``; 4.40 knows only ``torch_dtype``: neither warns."""
    import transformers

    build_base_model(
        BaseModelConfig(
            output=tmp_path / "m",
            llama2c_checkpoint=stories260k / "stories260K.bin",
            llama2c_tokenizer=stories260k / "tok512.model",
        )
    )
    assert "deprecated" not in capfd.readouterr().err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    key = "torch_dtype" if transformers.__version__.startswith("4.40") else "dtype"
    assert config[key] == "float32"


def test_llama2c_greedy_story(stories_hf: Path) -> None:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(stories_hf)).eval()
    sp = spm.SentencePieceProcessor(model_file=str(stories_hf / "tokenizer.model"))
    prompt = torch.tensor([[sp.bos_id()] + sp.encode("Once upon a time")])
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=48,
            do_sample=False,
            pad_token_id=sp.eos_id(),
        )
    story = sp.decode(out[0].tolist())
    # observed and read: a coherent little story (as llama2.c's own run.c continues this prompt)
    assert story.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")


def test_llama2c_tokenizer_saved_lossless_and_loadable(stories_hf: Path) -> None:
    from transformers import AutoTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((stories_hf / "tokenizer.model").read_bytes())
    assert proto.normalizer_spec.remove_extra_whitespaces is False
    sp = spm.SentencePieceProcessor(model_file=str(stories_hf / "tokenizer.model"))
    code = "module top (\n    input  wire clk,\n\toutput reg  [7:0] q\n);\n"
    assert sp.decode(sp.encode(code)) == code
    hf = AutoTokenizer.from_pretrained(str(stories_hf))
    assert hf(code).input_ids == [sp.bos_id()] + sp.encode(code)
    manifest = json.loads((stories_hf / "manifest.json").read_text())
    assert manifest["stage"] == "base-model" and "sha256" in manifest["inputs"]["llama2c_checkpoint"]


def test_llama2c_bad_inputs(stories260k: Path, llama2_tokenizer: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes((stories260k / "stories260K.bin").read_bytes()[:5000])
    with pytest.raises(UserInputError, match="float32 weights"):
        build_base_model(
            BaseModelConfig(
                output=tmp_path / "a",
                llama2c_checkpoint=truncated,
                llama2c_tokenizer=stories260k / "tok512.model",
            )
        )
    with pytest.raises(UserInputError, match="512"):
        build_base_model(
            BaseModelConfig(
                output=tmp_path / "b",
                llama2c_checkpoint=stories260k / "stories260K.bin",
                llama2c_tokenizer=llama2_tokenizer,
            )
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- the tiny pretrained model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small general corpus (Python docstrings, offline) and a quick SentencePiece BPE model on it."""
    root = tmp_path_factory.mktemp("tiny")
    general = root / "general"
    general.mkdir()
    records = list(general_sample_records(150_000))
    with open(general / "general.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(r["text"] for r in records),
        model_prefix=str(root / "tok"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
        max_sentence_length=100_000,
    )
    return general, root / "tok.model"


def tiny_config(inputs: tuple[Path, Path], output: Path, **overrides: object) -> BaseModelConfig:
    general, tokenizer = inputs
    values = dict(
        output=output,
        tokenizer=tokenizer,
        general_data=general,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        seq_length=32,
        batch_size=4,
        steps=20,
        warmup_steps=2,
        learning_rate=1e-2,
    )
    values.update(overrides)
    return BaseModelConfig(**values)


def test_tiny_model_trains_deterministically_and_is_cached(
    tiny_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    first = build_base_model(tiny_config(tiny_inputs, tmp_path / "one"))
    second = build_base_model(tiny_config(tiny_inputs, tmp_path / "two"))
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((first / "report.json").read_text())
    assert report["loss_last10"] < report["loss_first"] - 0.5  # it learned something
    model = LlamaForCausalLM.from_pretrained(str(first))
    assert model.config.vocab_size == 400 and not model.config.tie_word_embeddings
    assert "lm_head.weight" in a
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_inputs[1]))
    text = "Return the value of the attribute."
    assert tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text)

    mtime = (first / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    build_base_model(tiny_config(tiny_inputs, first))
    assert "reusing" in capsys.readouterr().out
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    build_base_model(tiny_config(tiny_inputs, first, steps=21))
    assert json.loads((first / "report.json").read_text())["tokens_seen"] == 21 * 4 * 32


def test_tiny_model_bad_inputs(
    tiny_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "missing.model"
    code = main(["base-model", "--tokenizer", str(missing), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "base-tokenizer" in err
    assert f"--tokenizer {missing} does not exist" in err and "pass --tokenizer" not in err  # the user just did
    with pytest.raises(UserInputError, match="num-heads"):
        build_base_model(tiny_config(tiny_inputs, tmp_path / "o", num_heads=3))
    with pytest.raises(UserInputError, match=f"--general-data {tmp_path / 'nowhere'} does not exist"):
        build_base_model(tiny_config(tiny_inputs, tmp_path / "o", general_data=tmp_path / "nowhere"))
    code = main(["base-model", "--llama2c-tokenizer", str(missing), "--output", str(tmp_path / "o")])
    assert code == 2 and f"--llama2c-tokenizer {missing} is only used with --llama2c-checkpoint" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-heads", "0"], "--num-heads 0 must be at least 1"),
        (["--num-kv-heads", "0"], "--num-kv-heads 0 must be at least 1"),
        (["--steps", "0"], "--steps 0 must be at least 1"),
        (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
        (["--threads", "0"], "--threads 0 must be at least 1"),
        (["--seq-length", "0"], "--seq-length 0 must be at least 1"),
        (["--learning-rate", "-0.001"], "--learning-rate -0.001 must be a positive number"),
        (["--learning-rate", "nan"], "--learning-rate nan must be a positive number"),
        (["--warmup-steps", "-1"], "--warmup-steps -1 must be 0 or more"),
        (["--seed", "-1"], "--seed -1 must be from 0 to"),
        (["--hidden-size", "30", "--num-heads", "2", "--num-kv-heads", "1"], "gives heads of 15 dimensions"),
    ],
)
def test_tiny_numbers_that_cannot_work_are_refused(
    tiny_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], message: str
) -> None:
    general, tokenizer = tiny_inputs
    argv = ["base-model", "--tokenizer", str(tokenizer), "--general-data", str(general)]
    argv += ["--output", str(tmp_path / "o")]
    assert main([*argv, "--steps", "2", "--seq-length", "16", "--batch-size", "2", *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_defaults_are_the_notebooks() -> None:
    """`python -m dapt base-model` with no options: the tiny notebook's call (its base tokenizer and data)."""
    from dapt.config import DEFAULT_GENERAL_DATA, DEFAULT_OUTPUTS
    from dapt.tokenizer import BaseTokenizerConfig

    config = BaseModelConfig()
    assert config.tokenizer == BaseTokenizerConfig().output / "tokenizer.model"
    assert config.general_data == DEFAULT_GENERAL_DATA == BaseTokenizerConfig().general_data
    assert config.output == DEFAULT_OUTPUTS / "tiny" / "base_model"
    assert config.llama2c_checkpoint is None and not config.tie_embeddings
