"""How the appended rows (ids ``base_vocab_size`` and above) of the embedding matrices are initialised.

- Domain tokens, input rows: ``mean`` (default) of the base input rows of the token's sub-tokens, or
  ``random`` (normal, mean 0, the standard deviation of all base rows' elements). Sub-tokens: the token's
  surface text (``▁`` read as a space) encoded by the BASE SentencePiece model with its dummy prefix and
  whitespace collapsing switched off. A token ``▁word`` is thus split exactly as the base tokenizer splits
  `` word`` in running text (``▁wo`` + ``rd``); no stray bare ``▁`` piece enters the average unless the
  base vocabulary itself has no piece joining that space to the next character.
- Domain tokens, output rows: ``zero`` (default, as in the ChipNeMo paper: the new token's logit starts at
  0) or ``mean`` (mean of the sub-tokens' base output rows).
- Reserved padding tokens: ``mean`` (default) of ALL base rows of the matrix, a token-neutral vector whose
  logit is the average base logit, or ``zero``.
- Tied embeddings (one matrix for input and output): a zero output row would also be a zero input row, so
  ``--output-init zero`` is refused; ``--output-init mean`` keeps the tie (the shared row follows
  ``--input-init``), ``--untie-embeddings`` writes a separate ``lm_head.weight`` (base rows copied) so the
  output rows can start at zero.

Original rows are copied bit for bit, so for inputs of original tokens the original tokens' logits do not
change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dapt.embeddings.checkpoint import EmbeddingsError
from dapt.embeddings.vocabulary import NewToken


@dataclass
class InitPlan:
    """How the appended rows of one matrix are filled."""

    domain: Literal["mean", "random", "zero"]
    reserved: Literal["mean", "zero"]


def init_plans(
    input_init: str, output_init: str, reserved_init: str, tied: bool, untie: bool, base_model: Path
) -> tuple[InitPlan, InitPlan | None]:
    """Plans for the input matrix and a separate output matrix (None: output and input share one)."""
    input_plan = InitPlan(input_init, reserved_init)
    if tied and not untie:
        if output_init == "zero":
            raise EmbeddingsError(
                f"--base-model {base_model} ties its input and output embeddings (one matrix): "
                "a new row cannot be a mean input row and a zero output row (--output-init zero) at once. "
                "Pass --output-init mean (the shared row follows --input-init) or --untie-embeddings "
                "(separate lm_head.weight, zero new rows)."
            )
        return input_plan, None
    return input_plan, InitPlan("zero" if output_init == "zero" else "mean", reserved_init)


def subtoken_encoder(base_proto: Any) -> Any:
    """The base SentencePiece model with dummy prefix and whitespace collapsing off, for surface texts."""
    import sentencepiece as spm

    from dapt.compat import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.CopyFrom(base_proto)
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def subtoken_ids(encoder: Any, token: str) -> list[int]:
    """Base ids of a new token's surface text (``▁`` read as a space)."""
    return list(encoder.encode(token.replace("\u2581", " ")))


def row_blocks(matrix: Any, dtype: Any, rows: int = 1024) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, block)``: consecutive row blocks copied into ONE reused buffer of ``dtype``.

    Reusing the buffer keeps memory flat: fresh block-sized copies fragment the C heap, and the process
    then holds hundreds of MB it no longer uses.
    """
    buffer = None
    for start in range(0, matrix.shape[0], rows):
        part = matrix[start : start + rows]
        if buffer is None or buffer.shape[0] != part.shape[0]:
            buffer = part.to(dtype, copy=True)  # never a view: the buffer is overwritten below
        else:
            buffer.copy_(part)
        yield start, buffer


def column_mean_and_std(matrix: Any) -> tuple[Any, float]:
    """The mean row and the standard deviation of all elements, by float32 row blocks (float64 totals)."""
    import torch

    total = torch.zeros(matrix.shape[1], dtype=torch.float64)
    squares = 0.0
    for _, block in row_blocks(matrix, torch.float32):
        total += block.sum(dim=0, dtype=torch.float64)
        flat = block.view(-1)
        squares += float(torch.dot(flat, flat))
    count = matrix.shape[0] * matrix.shape[1]
    mean_all = float(total.sum()) / count
    std = math.sqrt(max(squares / count - mean_all**2, 0.0))
    return (total / matrix.shape[0]).float(), std


def extended_matrix(
    base: Any, tokens: list[NewToken], subtokens: dict[int, list[int]], plan: InitPlan, seed: int
) -> Any:
    """The base matrix with one row appended per new token; base rows are copied bit for bit."""
    import torch

    base_rows, dim = base.shape
    out = torch.empty((base_rows + len(tokens), dim), dtype=base.dtype)
    out[:base_rows] = base
    mean_row, std = column_mean_and_std(base)
    domain = [t.id for t in tokens if t.kind == "domain"]
    reserved = [t.id for t in tokens if t.kind == "reserved"]
    if reserved:
        fill = mean_row if plan.reserved == "mean" else torch.zeros(dim)
        out[reserved] = fill.to(base.dtype).expand(len(reserved), dim)
    if plan.domain == "zero":
        out[domain] = 0
    elif plan.domain == "random":
        generator = torch.Generator().manual_seed(seed)
        out[domain] = (torch.randn(len(domain), dim, generator=generator) * std).to(base.dtype)
    else:
        _fill_means(out, base, domain, subtokens)
    return out


def _fill_means(out: Any, base: Any, domain: list[int], subtokens: dict[int, list[int]]) -> None:
    """Each domain row: the mean of its sub-tokens' base rows (vectorised, 256 new tokens at a time)."""
    import torch

    dim = base.shape[1]
    for start in range(0, len(domain), 256):
        block = domain[start : start + 256]
        flat = torch.tensor([i for t in block for i in subtokens[t]])
        owner = torch.tensor([k for k, t in enumerate(block) for _ in subtokens[t]])
        sums = torch.zeros(len(block), dim).index_add_(0, owner, base[flat].float())
        counts = torch.tensor([float(len(subtokens[t])) for t in block])
        out[block] = (sums / counts[:, None]).to(base.dtype)
