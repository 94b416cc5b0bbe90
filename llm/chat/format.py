"""Conversations: schema adapters, validation, rendering to tokens with a supervision mask.

A conversation is rendered as::

    <|bos|> <|user_start|> user text <|user_end|> <|assistant_start|> reply <|assistant_end|> <|user_start|> ...

and the supervision mask marks the tokens the model is trained to produce: the assistant's
content and its ``<|assistant_end|>`` (so it learns to stop). ``<|assistant_start|>`` is not
supervised: at inference time we write it ourselves to hand the turn to the model.

Real chat datasets disagree on keys, so rows pass through an adapter first:

- SmolTalk-style ``messages``: a list of ``{"role", "content"}``;
- ShareGPT-style ``conversations``: a list of ``{"from", "value"}`` with ``human``/``gpt``;
- variants of either: a ``conversation`` / ``dialog`` column, message keys ``role``/``from``/``speaker``
  for the speaker and ``content``/``value``/``text`` for the text, speaker names such as
  ``user``/``human``/``prompter`` and ``assistant``/``gpt``/``bot``/``model``;
- single-turn pair columns: ``user``/``assistant``, ``prompt``/``response``, ``question``/``answer``;
- Alpaca: ``instruction`` + optional ``input`` + ``output``.

A row that cannot be used is dropped with a named reason (:data:`DROP_REASONS`); a
:class:`DropReport` counts them and keeps a few row indices per reason so nothing is
dropped silently. A dataset whose columns match no adapter is an error naming the columns.

Reading a chat set (local files, or remote ones fetched into the cache) is llm/chat/sources.py;
this module works on rows and conversations already in memory.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from llm.stages.output import StageError
from llm.storage import atomic_path

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

# Speaker names seen in the wild, mapped to the three roles we know.
ROLE_ALIASES: dict[str, str] = {
    "user": USER, "human": USER, "prompter": USER, "customer": USER, "question": USER,
    "assistant": ASSISTANT, "gpt": ASSISTANT, "bot": ASSISTANT, "model": ASSISTANT, "chatgpt": ASSISTANT,
    "ai": ASSISTANT, "answer": ASSISTANT,
    "system": SYSTEM,
}
MESSAGE_LIST_COLUMNS = ("messages", "conversations", "conversation", "dialog", "turns")
ROLE_KEYS = ("role", "from", "speaker", "author")
CONTENT_KEYS = ("content", "value", "text")
PAIR_COLUMNS = (("user", "assistant"), ("prompt", "response"), ("question", "answer"))

DROP_REASONS = {
    "malformed": "a message is not a mapping, lacks a role/content key, or its content is not a string",
    "unknown_role": "a speaker name that is not user/assistant/system (or an alias)",
    "empty_conversation": "no messages at all",
    "empty_content": "a message whose content is empty or whitespace",
    "message_too_long": "a message longer than chat_data.max_chars_per_message characters",
    "roles_not_alternating": "turns do not alternate user/assistant starting with user (system only first)",
    "no_assistant_reply": "the conversation does not end with an assistant reply",
    "no_supervised_tokens": "after truncation to the token limit no assistant token is left",
}


class ChatSchemaError(StageError):
    """The dataset's columns match no known chat schema."""


class DropRow(Exception):
    """Raised by adapters/validation: this row is unusable for ``reason`` (a key of DROP_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


Message = dict[str, str]  # {"role": "user"|"assistant"|"system", "content": str}


# --------------------------------------------------------------------------- drop accounting


@dataclass
class DropReport:
    """Rows in, rows kept, and every dropped row counted by reason (with a few examples)."""

    name: str = "chat"
    rows_in: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3
    truncated: int = 0  # kept, but cut to the token limit
    last_row: int = -1  # source row index of the conversation most recently yielded by normalize_rows

    def drop(self, where: int | str, exc: DropRow) -> None:
        """Count one dropped row; ``where`` is a row index or a label such as "conversation 7"."""
        self.dropped[exc.reason] += 1
        ex = self.examples.setdefault(exc.reason, [])
        if len(ex) < self.max_examples:
            label = f"row {where}" if isinstance(where, int) else where
            ex.append(label + (f": {exc.detail}" if exc.detail else ""))

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "dropped_by_reason": dict(sorted(self.dropped.items())),
            "drop_examples": {k: v for k, v in sorted(self.examples.items())},
            "truncated": self.truncated,
        }

    def summary(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        s = f"[{self.name}] {self.rows_in} rows in, {self.rows_kept} kept, {self.rows_dropped} dropped ({parts})"
        if self.truncated:
            s += f", {self.truncated} truncated to the token limit"
        return s


# --------------------------------------------------------------------------- schema adapters


def _canonical_role(raw: Any) -> str:
    if not isinstance(raw, str):
        raise DropRow("malformed", f"speaker {raw!r} is not a string")
    role = ROLE_ALIASES.get(raw.strip().lower())
    if role is None:
        raise DropRow("unknown_role", f"speaker {raw!r}")
    return role


def _message_from_mapping(m: Any, i: int) -> Message:
    if not isinstance(m, dict):
        raise DropRow("malformed", f"message {i} is a {type(m).__name__}, not a mapping")
    rk = next((k for k in ROLE_KEYS if k in m), None)
    ck = next((k for k in CONTENT_KEYS if k in m), None)
    if rk is None or ck is None:
        raise DropRow("malformed", f"message {i} has keys {sorted(m)}; need one of {ROLE_KEYS} and one of {CONTENT_KEYS}")
    content = m[ck]
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise DropRow("malformed", f"message {i} content is a {type(content).__name__}")
    return {"role": _canonical_role(m[rk]), "content": content}


def _str_field(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DropRow("malformed", f"column {key!r} is a {type(v).__name__}")
    return v


Adapter = Callable[[dict[str, Any]], list[Message]]


def _list_adapter(column: str) -> Adapter:
    def adapt(row: dict[str, Any]) -> list[Message]:
        msgs = row.get(column)
        if msgs is None:
            raise DropRow("empty_conversation", f"column {column!r} is null")
        if isinstance(msgs, np.ndarray):
            msgs = msgs.tolist()
        if not isinstance(msgs, (list, tuple)):
            raise DropRow("malformed", f"column {column!r} is a {type(msgs).__name__}, not a list")
        return [_message_from_mapping(m, i) for i, m in enumerate(msgs)]

    adapt.__name__ = f"list:{column}"
    return adapt


def _pair_adapter(ucol: str, acol: str) -> Adapter:
    def adapt(row: dict[str, Any]) -> list[Message]:
        msgs = [{"role": USER, "content": _str_field(row, ucol)}, {"role": ASSISTANT, "content": _str_field(row, acol)}]
        if "system" in row and isinstance(row["system"], str) and row["system"].strip():
            msgs.insert(0, {"role": SYSTEM, "content": row["system"]})
        return msgs

    adapt.__name__ = f"pair:{ucol}/{acol}"
    return adapt


def _alpaca(row: dict[str, Any]) -> list[Message]:
    instruction, extra = _str_field(row, "instruction"), _str_field(row, "input")
    # Alpaca's optional input is context for the instruction: same user turn, after a blank line.
    user = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction
    return [{"role": USER, "content": user}, {"role": ASSISTANT, "content": _str_field(row, "output")}]


def detect_schema(columns: Iterable[str]) -> tuple[str, Adapter]:
    """The adapter for a dataset with these columns, or :class:`ChatSchemaError` naming them."""
    cols = list(columns)
    have = set(cols)
    for c in MESSAGE_LIST_COLUMNS:
        if c in have:
            name = {"messages": "smoltalk", "conversations": "sharegpt"}.get(c, f"messages-list:{c}")
            return name, _list_adapter(c)
    if {"instruction", "output"} <= have:
        return "alpaca", _alpaca
    for u, a in PAIR_COLUMNS:
        if {u, a} <= have:
            return f"pair:{u}/{a}", _pair_adapter(u, a)
    raise ChatSchemaError(
        f"unknown chat schema: columns found {cols}; expected one of: a message-list column "
        f"{list(MESSAGE_LIST_COLUMNS)} (SmolTalk role/content, ShareGPT from/value), Alpaca instruction/input/output, "
        f"or a pair of columns {[f'{u}/{a}' for u, a in PAIR_COLUMNS]}"
    )


# --------------------------------------------------------------------------- validation


def validate(messages: list[Message], max_chars: int) -> list[Message]:
    """Fold a leading system message into the first user turn and check the conversation.

    Returns user/assistant messages that alternate, start with the user and end with the
    assistant; raises :class:`DropRow` with the first problem found.
    """
    if not messages:
        raise DropRow("empty_conversation")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise DropRow("empty_content", f"message {i} ({m['role']})")
        if len(m["content"]) > max_chars:
            raise DropRow("message_too_long", f"message {i} has {len(m['content'])} chars > {max_chars}")
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] == SYSTEM:
        if len(msgs) < 2 or msgs[1]["role"] != USER:
            raise DropRow("roles_not_alternating", "a system message must be followed by a user message")
        system = msgs.pop(0)
        msgs[0]["content"] = f"{system['content']}\n\n{msgs[0]['content']}"
    for i, m in enumerate(msgs):
        want = USER if i % 2 == 0 else ASSISTANT
        if m["role"] != want:
            raise DropRow("roles_not_alternating", f"turn {i} is {m['role']}, expected {want}")
    if msgs[-1]["role"] != ASSISTANT:
        raise DropRow("no_assistant_reply", f"last of {len(msgs)} turns is from the user")
    return msgs


def normalize_rows(rows: Iterable[dict[str, Any]], max_chars: int, report: DropReport,
                   adapter: Adapter | None = None) -> Iterator[list[Message]]:
    """Adapt + validate each row; dropped rows land in ``report``. The schema is detected from the first row."""
    for i, row in enumerate(rows):
        if adapter is None:
            _, adapter = detect_schema(row.keys())
        report.rows_in += 1
        try:
            msgs = validate(adapter(row), max_chars)
        except DropRow as e:
            report.drop(i, e)
            continue
        report.rows_kept += 1
        report.last_row = i  # lets a consumer (render_many) name the source row of a later drop
        yield msgs


# --------------------------------------------------------------------------- rendering


class ChatTokenizer(Protocol):
    bos_id: int

    def encode_batch(self, texts: list[str], num_threads: int = ...) -> list[list[int]]: ...

    def special_id(self, name: str) -> int: ...


@dataclass(frozen=True)
class ChatSpecials:
    bos: int
    user_start: int
    user_end: int
    assistant_start: int
    assistant_end: int

    @classmethod
    def of(cls, tok: ChatTokenizer) -> "ChatSpecials":
        return cls(
            bos=tok.special_id("<|bos|>"),
            user_start=tok.special_id("<|user_start|>"),
            user_end=tok.special_id("<|user_end|>"),
            assistant_start=tok.special_id("<|assistant_start|>"),
            assistant_end=tok.special_id("<|assistant_end|>"),
        )


def _assemble(sp: ChatSpecials, roles: Sequence[str], encoded: Sequence[list[int]]) -> tuple[list[int], list[int]]:
    ids, mask = [sp.bos], [0]
    for role, toks in zip(roles, encoded):
        if role == USER:
            ids += [sp.user_start, *toks, sp.user_end]
            mask += [0] * (len(toks) + 2)
        else:
            ids += [sp.assistant_start, *toks, sp.assistant_end]
            mask += [0] + [1] * (len(toks) + 1)
    return ids, mask


def render_conversation(tok: ChatTokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids and the 0/1 supervision mask (same length) of one validated conversation."""
    sp = ChatSpecials.of(tok)
    enc = tok.encode_batch([m["content"] for m in messages])
    return _assemble(sp, [m["role"] for m in messages], enc)


def render_prompt(tok: ChatTokenizer, messages: list[Message]) -> list[int]:
    """The ids that prime the model for its next reply: the history (ending with a user turn) + ``<|assistant_start|>``."""
    sp = ChatSpecials.of(tok)
    if messages and messages[0]["role"] == SYSTEM:
        messages = [{"role": USER, "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}, *messages[2:]]
    enc = tok.encode_batch([m["content"] for m in messages]) if messages else []
    ids, _ = _assemble(sp, [m["role"] for m in messages], enc)
    return ids + [sp.assistant_start]


@dataclass
class RenderedChats:
    """Many rendered conversations, concatenated: ``ids[offsets[i]:offsets[i+1]]`` is conversation i."""

    ids: np.ndarray  # uint16/uint32
    mask: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len N+1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]

    # Stored as three .npy files so loaders can memmap them without the tokenizer.
    def save(self, directory: str | Path, name: str) -> dict[str, str]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {}
        for part, arr in (("ids", self.ids), ("mask", self.mask), ("offsets", self.offsets)):
            final = d / f"{name}.{part}.npy"
            with atomic_path(final) as tmp, open(tmp, "wb") as f:  # streamed: no second copy in memory
                np.save(f, arr)
            files[part] = final.name
        return files

    @classmethod
    def load(cls, directory: str | Path, name: str, mmap: bool = True) -> "RenderedChats":
        d = Path(directory)
        mode = "r" if mmap else None
        arrays = {}
        for part in ("ids", "mask", "offsets"):
            p = d / f"{name}.{part}.npy"
            if not p.exists():
                raise FileNotFoundError(f"rendered chat file missing: {p}")
            arrays[part] = np.load(p, mmap_mode=mode)
        out = cls(**arrays)
        if len(out.ids) != len(out.mask) or (len(out.offsets) and int(out.offsets[-1]) != len(out.ids)):
            raise StageError(f"{d}/{name}.*.npy: ids/mask/offsets lengths disagree (corrupt or mixed files)")
        return out


def render_many(
    tok: ChatTokenizer,
    conversations: Iterable[list[Message]],
    *,
    vocab_size: int,
    max_tokens: int | None = None,
    report: DropReport | None = None,
    batch: int = 512,
    num_threads: int | None = None,
) -> RenderedChats:
    """Render validated conversations in batches (one ``encode_batch`` call per batch).

    ``max_tokens`` truncates a longer conversation (counted in ``report.truncated``); if no
    supervised token survives the cut the conversation is dropped as ``no_supervised_tokens``.
    """
    sp = ChatSpecials.of(tok)
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    rendered: list[tuple[np.ndarray, np.ndarray]] = []
    pending: list[tuple[list[Message], int | str]] = []
    for index, conv in enumerate(conversations):
        # Name drops by source row when the conversations come from normalize_rows, else by position.
        where: int | str = report.last_row if report is not None and report.last_row >= 0 else f"conversation {index}"
        pending.append((conv, where))
        if len(pending) >= batch:
            rendered += _render_batch(tok, sp, pending, dtype, max_tokens, report, num_threads)
            pending = []
    rendered += _render_batch(tok, sp, pending, dtype, max_tokens, report, num_threads)
    offsets = np.zeros(len(rendered) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids, _ in rendered], out=offsets[1:])
    return RenderedChats(
        ids=np.concatenate([ids for ids, _ in rendered]) if rendered else np.zeros(0, dtype=dtype),
        mask=np.concatenate([mask for _, mask in rendered]) if rendered else np.zeros(0, dtype=np.uint8),
        offsets=offsets,
    )


def _render_batch(tok: ChatTokenizer, sp: ChatSpecials, pending: list[tuple[list[Message], int | str]], dtype: Any,
                  max_tokens: int | None, report: DropReport | None, num_threads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) arrays of a batch of conversations, encoded in one call; each cut to ``max_tokens``,
    and dropped (into ``report``) when the cut leaves no supervised token."""
    texts = [m["content"] for conv, _ in pending for m in conv]
    enc = tok.encode_batch(texts, num_threads=num_threads) if texts else []
    out: list[tuple[np.ndarray, np.ndarray]] = []
    k = 0
    for conv, where in pending:
        ids, mask = _assemble(sp, [m["role"] for m in conv], enc[k:k + len(conv)])
        k += len(conv)
        if max_tokens is not None and len(ids) > max_tokens:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            if report is not None:
                report.truncated += 1
            if not any(mask):
                if report is not None:
                    report.rows_kept -= 1
                    report.drop(where, DropRow("no_supervised_tokens", f"{max_tokens}-token limit"))
                continue
        out.append((np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8)))
    return out
