"""Domain-adaptive tokenization and pretraining of Llama 2 (the ChipNeMo recipe), stage by stage.

Stages, in data-flow order: corpus -> tokenizer -> embeddings -> megatron_data ->
(nemo_launch | cpu_train) -> evaluate -> export. ``python -m dapt --help`` lists them.
"""

__version__ = "0.1.0"
