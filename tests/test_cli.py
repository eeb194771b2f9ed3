"""The command line: every stage's help, profiles as defaults, config files and the printed resolved config."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dapt.cli import STAGES, main
from dapt.config import DEFAULT_OUTPUTS, PROFILES, config_for, stage_defaults

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dapt", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_top_level_help_lists_every_stage_in_plain_text() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for name, stage in STAGES.items():
        assert f"  {name}" in result.stdout and stage.description in result.stdout
    assert "``" not in result.stdout and "`" not in result.stdout


def test_no_stage_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage: python -m dapt <stage>" in capsys.readouterr().out


def test_unknown_stage_is_refused_with_the_list(capsys: pytest.CaptureFixture) -> None:
    assert main(["tokenise"]) == 2
    error = capsys.readouterr().err
    assert "unknown stage 'tokenise'" in error and "tokenizer" in error


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_shows_each_default_once_in_plain_form(stage: str) -> None:
    result = _run(stage, "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "PosixPath(" not in text and "('" not in text, "defaults are shown as values, not reprs"
    assert "--profile" in text and "--config" in text and "--print-config" in text
    for line in text.splitlines():
        assert line.count("(default:") <= 1, line


REQUIRED = {"serve": ["--model", "outputs/tiny/export"]}


@pytest.mark.parametrize("stage", list(STAGES))
def test_printed_config_reads_back_to_the_same_config(stage: str, tmp_path: Path) -> None:
    printed = _run(stage, *REQUIRED.get(stage, []), "--print-config")
    assert printed.returncode == 0, printed.stderr[-2000:]
    config_file = tmp_path / f"{stage}.yaml"
    config_file.write_text(printed.stdout)
    again = _run(stage, "--config", str(config_file), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == printed.stdout
    assert yaml.safe_load(printed.stdout)  # plain YAML, no Python objects


def test_command_line_options_win_over_the_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "tok.yaml"
    config_file.write_text("domain-vocab-size: 3000\nmax_added_tokens: 256\nmethod: chipnemo\n")
    result = _run("tokenizer", "--config", str(config_file), "--domain-vocab-size", "5000", "--print-config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert (resolved["domain_vocab_size"], resolved["max_added_tokens"], resolved["method"]) == \
        (5000, 256, "chipnemo")


@pytest.mark.parametrize(("content", "message"), [
    ("domain_vocab: 3\n", "'domain_vocab' is not an option of this stage"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [1\n", "not a readable YAML file"),
])
def test_bad_config_files_are_refused(tmp_path: Path, content: str, message: str,
                                      capsys: pytest.CaptureFixture) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(content)
    assert main(["tokenizer", "--config", str(config_file)]) == 2
    error = capsys.readouterr().err
    assert message in error and str(config_file) in error


def test_missing_config_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["tokenizer", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bad_values_exit_2_without_traceback() -> None:
    result = _run("tokenizer", "--domain-vocab-size", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = _run("tokenizer", "--profile", "llama3")
    assert result.returncode == 2 and "--profile llama3 is not a profile" in result.stderr


def test_profile_defaults_move_outputs_and_sizes() -> None:
    from dapt.tokenizer import TokenizerConfig

    tiny = stage_defaults(TokenizerConfig, "tiny")
    assert tiny["output"] == DEFAULT_OUTPUTS / "tiny" / "tokenizer"
    for name in PROFILES:
        if name == "tiny":
            continue
        values = stage_defaults(TokenizerConfig, name)
        assert values["output"] == DEFAULT_OUTPUTS / name / "tokenizer"
        assert values["domain_vocab_size"] == 16000 and values["max_added_tokens"] is None
    result = _run("tokenizer", "--profile", "llama2-7b", "--print-config")
    resolved = yaml.safe_load(result.stdout)
    assert resolved["profile"] == "llama2-7b" and resolved["domain_vocab_size"] == 16000
    assert resolved["output"] == str(DEFAULT_OUTPUTS / "llama2-7b" / "tokenizer")


def test_a_profile_in_the_config_file_selects_its_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "tok.yaml"
    config_file.write_text("profile: llama2-13b\n")
    resolved = yaml.safe_load(_run("tokenizer", "--config", str(config_file), "--print-config").stdout)
    assert resolved["output"] == str(DEFAULT_OUTPUTS / "llama2-13b" / "tokenizer")


def test_profile_fields_left_unset_show_the_profiles_values() -> None:
    from dapt.cpu_train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = stage_defaults(TrainConfig, "tiny")
    if "max_steps" in fields:
        assert values["max_steps"] == PROFILES["tiny"].max_steps


def test_config_for_applies_overrides_on_the_profile_defaults() -> None:
    from dapt.tokenizer import TokenizerConfig

    config = config_for(TokenizerConfig, "llama2-7b", domain_vocab_size=12000)
    assert config.domain_vocab_size == 12000 and config.output == DEFAULT_OUTPUTS / "llama2-7b" / "tokenizer"
