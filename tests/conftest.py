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
