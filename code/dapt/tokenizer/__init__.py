"""Domain-adapted tokenizer: the ChipNeMo recipe's tokenizer steps, one module each.

The stage (:mod:`.stage`, ``python -m dapt tokenizer``) runs them in this order:

1. :mod:`.domain_tokenizer`  train a domain SentencePiece tokenizer with Llama 2's trainer settings
2. :mod:`.candidates`        its pieces the base lacks and general text rarely uses
3. :mod:`.guided_bpe`        select: continued BPE over the base segmentation (default), or
   :mod:`.chipnemo`          select: the original recipe, USER_DEFINED pieces and a cumulative cut
4. :mod:`.extend`            merge the selection into the base model; pad the vocabulary
5. :mod:`.reachability`      which added pieces SentencePiece produces; prune the others
6. :mod:`.hf_files`          the Hugging Face tokenizer files, written from the SentencePiece model
7. :mod:`.report`, :mod:`.plots`  token counts before and after, round trips, HF agreement, plots

Beneath them: :mod:`.sentencepiece_model` (model files and processors), :mod:`.chunked_encoding` (exact ids
chunk by chunk), :mod:`.corpus_passes` (the streamed passes over the corpora). :mod:`.base_tokenizer` is the
tiny profile's ``base-tokenizer`` stage.
"""

from dapt.tokenizer.base_tokenizer import BaseTokenizerConfig, train_base_tokenizer
from dapt.tokenizer.chunked_encoding import ChunkEncoder, chunk_safe, encode_texts
from dapt.tokenizer.domain_tokenizer import LLAMA2_TRAINER_SETTINGS, train_sentencepiece
from dapt.tokenizer.hf_files import hf_tokenizer_files, write_hf_tokenizer
from dapt.tokenizer.sentencepiece_model import (
    BYTE,
    CONTROL,
    NORMAL,
    TOKENIZER_FILE,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    TokenizerError,
    load_proto,
    processor,
    resolve_sp_model,
)
from dapt.tokenizer.stage import DOMAIN_TOKENS_FILE, TokenizerConfig, adapt_tokenizer

__all__ = [
    "BYTE", "CONTROL", "DOMAIN_TOKENS_FILE", "LLAMA2_TRAINER_SETTINGS", "NORMAL", "TOKENIZER_FILE", "UNKNOWN",
    "UNUSED", "USER_DEFINED", "BaseTokenizerConfig", "ChunkEncoder", "TokenizerConfig", "TokenizerError",
    "adapt_tokenizer", "chunk_safe", "encode_texts", "hf_tokenizer_files", "load_proto", "processor",
    "resolve_sp_model", "train_base_tokenizer", "train_sentencepiece", "write_hf_tokenizer",
]
