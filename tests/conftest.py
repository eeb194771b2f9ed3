"""Shared fixtures: paths to the real corpora and models in ../shared (skipped where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read the real corpora/models from ../shared")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: real domain, general and held-out JSONL corpora."""
    return _shared_path("data")


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    """The real Llama 2 SentencePiece model."""
    return _shared_path("models/llama2-tokenizer/tokenizer.model")


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """Folder with llama2.c's stories260K.bin and tok512.model."""
    return _shared_path("models/stories260K")


@pytest.fixture(scope="session", autouse=True)
def embedded_sample() -> Path:
    """The embedded offline sample (code/data, code/general_data, code/heldout), built once where absent.

    A clean checkout has none (it is assembled from installed packages, not committed); several tests read
    its held-out files, so they run on it instead of skipping.
    """
    from dapt.corpus import DEFAULT_HELDOUT, SampleDataConfig, build_sample_data

    wanted = [DEFAULT_HELDOUT / kind / f"{kind}_heldout.jsonl" for kind in ("domain", "general")]
    if not all(path.is_file() for path in wanted):
        build_sample_data(SampleDataConfig())
    return DEFAULT_HELDOUT
