"""Extend a Llama checkpoint's embedding and output layers to the adapted tokenizer's vocabulary.

Checkpoint surgery on safetensors files, never loading the whole model: only ``model.embed_tokens.weight``
and ``lm_head.weight`` are read into memory, one at a time; the shard(s) holding them are rewritten with the
other tensors' bytes streamed unchanged; the other shards are hard-linked (copied where links are
impossible); ``config.json`` gets the new ``vocab_size``; the ADAPTED tokenizer files replace the base ones.

One module per job, each read whole on its own:

- ``safetensors_io``: safetensors headers, reading one tensor, rewriting a file tensor by tensor;
- ``checkpoint``: the HF folder (``config.json``, single file or shards with an index);
- ``vocabulary``: does the adapted tokenizer extend the checkpoint's? the list of appended tokens;
- ``init_rules``: how new input, output and reserved rows are initialised (the rules are in its docstring);
- ``norms``: row norms for the report and the histogram plot;
- ``sanity``: load the result, compare original logits, score held-out text;
- ``stage``: ``EmbeddingsConfig`` and ``extend_embeddings``, the stage entry (``python -m dapt embeddings``).
"""

from dapt.embeddings.checkpoint import EMBED, LM_HEAD, EmbeddingsError
from dapt.embeddings.stage import EmbeddingsConfig, extend_embeddings

__all__ = ["EMBED", "LM_HEAD", "EmbeddingsConfig", "EmbeddingsError", "extend_embeddings"]
