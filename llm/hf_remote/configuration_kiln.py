"""transformers configuration for a Kiln model exported with remote code (``trust_remote_code=True``).

Shipped verbatim by ``kiln export`` (llm/export.py) next to ``modeling_kiln.py``. ``kiln`` holds Kiln's own
``GPTConfig.to_dict()``: the network is built from exactly what Kiln trained, every field included, so a
new Kiln architecture option needs no change here. The usual transformers names (``hidden_size``,
``num_hidden_layers``, ``max_position_embeddings`` …) are written beside it, for tools that read them.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class KilnConfig(PretrainedConfig):
    """Declared fields, as transformers 5 configurations are dataclasses (undeclared generation keys
    such as ``use_cache`` would be dropped on load)."""

    model_type = "kiln"

    kiln: dict[str, Any] | None = None  # Kiln's GPTConfig.to_dict(): what the network is built from
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    max_position_embeddings: int = 0
    use_cache: bool = True
    tie_word_embeddings: bool = False  # Kiln's lm_head is untied from the embedding
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
