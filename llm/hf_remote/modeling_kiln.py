"""transformers model for a Kiln export that transformers' NanoChat cannot express (``trust_remote_code``).

Shipped verbatim by ``kiln export`` (llm/export.py) with ``kiln_gpt.py``, which is Kiln's own
``llm/model.py`` copied byte for byte at export time. This file only adapts it to transformers' calling
convention, so the model is Kiln's model by construction, not a re-implementation that could drift:

* the weights are Kiln's parameter names under ``model.``;
* generation uses transformers' ``DynamicCache`` through a view with Kiln's KV-cache interface (``pos``
  and ``update(layer, k, v)``), so Kiln's attention (sliding windows included) runs unchanged;
* padded batches are refused: Kiln's attention has no padding mask, and a silently wrong answer is worse.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_kiln import KilnConfig
from .kiln_gpt import GPT, GPTConfig, rotary_tables


class _KilnCacheView:
    """Kiln's KV-cache interface over a transformers cache, for one forward call."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.pos = cache.get_seq_length()  # tokens already stored; Kiln's forward advances it

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)

    # The smear option reads the previous chunk's last token embedding: it lives with the transformers
    # cache, which outlives this per-call view.
    @property
    def prev_embedding(self) -> torch.Tensor | None:
        return getattr(self.cache, "kiln_prev_embedding", None)

    @prev_embedding.setter
    def prev_embedding(self, value: torch.Tensor | None) -> None:
        self.cache.kiln_prev_embedding = value


class KilnForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = KilnConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: KilnConfig) -> None:
        super().__init__(config)
        self.model = GPT(GPTConfig.from_dict(config.kiln))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from model.safetensors; only the rotary tables (derived data, not saved)
        are computed here, as Kiln computes them."""
        if isinstance(module, GPT):
            cos, sin = rotary_tables(module.rope_cos.shape[0], module.config.head_dim, module.config.rope_base,
                                     module.rope_cos.device)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.wte

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None,
                use_cache: bool | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """``cache`` is transformers 5's name for the KV cache; ``past_key_values`` (its older name) works too."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("Kiln models do not support padded batches (attention_mask with zeros): Kiln's "
                             "attention has no padding mask; run one sequence at a time (batch_size=1)")
        cache = cache if cache is not None else kwargs.get("past_key_values")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        view = _KilnCacheView(cache) if use_cache else None
        logits = self.model(input_ids, kv_cache=view)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
