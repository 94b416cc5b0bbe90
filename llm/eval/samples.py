"""Greedy sample completions: the one sampler behind every logged sample.

Samples are a qualitative check read by people next to the loss curves, so they must be comparable:
temperature 0 gives the same text every time for the same weights, between steps of one run and
between runs. Three places show them, all through here:

- the trainer's periodic ``samples.json`` (:func:`complete`: BOS + the prompt's tokens);
- the eval stage's ``samples.json`` (the same, for one checkpoint);
- the SFT stage's ``chat_samples.json`` (:func:`chat_answers`: the prompt rendered as a user turn,
  the answer cut at the end of the assistant turn).

``kiln chat`` (``llm.cli.chat``) has its own loop on purpose: it samples with temperature and top-k
and streams the reply token by token as it is generated.
"""

from __future__ import annotations

import contextlib
from typing import Any, Collection

import torch


def greedy(model: Any, ids: list[int], max_new_tokens: int, *, stop_ids: Collection[int] = ()) -> list[int]:
    """The greedy continuation of ``ids`` (in eval mode, restored after), up to and excluding a stop id.

    Runs under whatever autocast the caller has entered (the trainer samples in its training dtype).
    """
    stops = set(stop_ids)
    was_training = model.training
    model.eval()
    try:
        new = list(model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=stops or None))
    finally:
        model.train(was_training)
    return [t for t in new if t not in stops]


def complete(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, *,
             amp_dtype: torch.dtype | None = None) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` for each plain-text prompt, continued from BOS + its tokens."""
    device = next(model.parameters()).device
    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    out = []
    with amp:
        for p in prompts:
            new = greedy(model, [tokenizer.bos_id, *tokenizer.encode(p)], max_new_tokens)
            out.append({"prompt": p, "completion": tokenizer.decode(new)})
    return out


def chat_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[dict[str, str]]:
    """``{"prompt", "answer"}``: each prompt as a single user turn, answered until the assistant turn ends."""
    from llm.chat.format import ChatSpecials, render_prompt

    sp = ChatSpecials.of(tokenizer)
    stops = {sp.assistant_end, sp.bos, sp.user_start}
    out = []
    for p in prompts:
        ids = render_prompt(tokenizer, [{"role": "user", "content": p}])
        out.append({"prompt": p, "answer": tokenizer.decode(greedy(model, ids, max_new_tokens, stop_ids=stops))})
    return out
