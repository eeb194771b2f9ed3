"""Differences between the library versions the package supports (fresh pins and the NeMo 24.07 container).

``sentencepiece_model_pb2``: the SentencePiece model-proto module. Import it from here, never from
``sentencepiece`` directly. transformers 4.40 (NeMo 24.07) converts SentencePiece models with its own
generated copy of ``sentencepiece_model.proto`` (``transformers.utils.sentencepiece_model_pb2_new``);
loading that copy and ``sentencepiece.sentencepiece_model_pb2`` in one process fails under protobuf 4.x with
"Couldn't build proto file into descriptor pool: duplicate file name sentencepiece_model.proto".
Newer transformers (e.g. 4.57) uses SentencePiece's own module instead. This module makes every version do
that: it registers SentencePiece's module under the name of transformers' copy, so transformers 4.40 finds
it there and never loads its own. (If transformers' copy was loaded first, that copy is shared instead.)
Importing this module is cheap: it does not import transformers.
"""

from __future__ import annotations

import sys
from types import ModuleType

TRANSFORMERS_COPY = "transformers.utils.sentencepiece_model_pb2_new"


def _shared_sentencepiece_model_pb2() -> ModuleType:
    """The one SentencePiece model-proto module that this process and transformers both use."""
    already_loaded = sys.modules.get(TRANSFORMERS_COPY)
    if already_loaded is not None:
        return already_loaded
    from sentencepiece import sentencepiece_model_pb2

    sys.modules[TRANSFORMERS_COPY] = sentencepiece_model_pb2
    return sentencepiece_model_pb2


sentencepiece_model_pb2 = _shared_sentencepiece_model_pb2()
