"""Chat rendering: masks on every schema, system folding, validation reasons, unknown schemas."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.chat.format import (
    ChatSchemaError,
    DropReport,
    detect_schema,
    normalize_rows,
    render_conversation,
    render_many,
    render_prompt,
    validate,
)
from llm.chat.sources import load_conversations

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]


class ByteTokenizer:
    """Bytes as tokens plus the chat specials: makes every mask position checkable by eye."""

    vocab_size = 256 + len(SPECIALS)
    bos_id = 256

    def special_id(self, name: str) -> int:
        return 256 + SPECIALS.index(name)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode(errors="replace"))
            run = bytearray()
            out.append(SPECIALS[i - 256])
        return "".join(out) + run.decode(errors="replace")


TOK = ByteTokenizer()
AEND = TOK.special_id("<|assistant_end|>")

# One row per schema, all meaning the same two-exchange conversation (Alpaca/pairs are single-turn).
SCHEMA_ROWS = {
    "smoltalk": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                   {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    "messages-list:conversation": {"conversation": [{"speaker": "user", "text": "Hi"}, {"speaker": "bot", "text": "Hello!"},
                                                    {"speaker": "user", "text": "2+2?"}, {"speaker": "bot", "text": "4"}]},
    "pair:user/assistant": {"user": "Hi", "assistant": "Hello!"},
    "alpaca": {"instruction": "Add", "input": "2+2", "output": "4"},
}
EXPECTED_REPLIES = {
    "smoltalk": ["Hello!", "4"], "sharegpt": ["Hello!", "4"], "messages-list:conversation": ["Hello!", "4"],
    "pair:user/assistant": ["Hello!"], "alpaca": ["4"],
}
EXPECTED_USERS = {
    "smoltalk": ["Hi", "2+2?"], "sharegpt": ["Hi", "2+2?"], "messages-list:conversation": ["Hi", "2+2?"],
    "pair:user/assistant": ["Hi"], "alpaca": ["Add\n\n2+2"],
}


def supervised_spans(ids: list[int], mask: list[int]) -> list[str]:
    """Maximal runs of supervised tokens, decoded."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(TOK.decode(cur))
            cur = []
    if cur:
        spans.append(TOK.decode(cur))
    return spans


@pytest.mark.parametrize("schema", list(SCHEMA_ROWS))
def test_masks_supervise_exactly_assistant_content_and_end(schema: str) -> None:
    row = SCHEMA_ROWS[schema]
    name, adapter = detect_schema(row.keys())
    assert name == schema
    msgs = validate(adapter(row), max_chars=1000)
    ids, mask = render_conversation(TOK, msgs)
    assert len(ids) == len(mask)
    assert ids[0] == TOK.bos_id and mask[0] == 0
    # Supervised = each reply followed by <|assistant_end|>, nothing else.
    assert supervised_spans(ids, mask) == [r + "<|assistant_end|>" for r in EXPECTED_REPLIES[schema]]
    # Unsupervised text is exactly the scaffolding and user turns.
    unsup = TOK.decode([i for i, m in zip(ids, mask) if not m])
    expected = "<|bos|>" + "".join(f"<|user_start|>{u}<|user_end|><|assistant_start|>" for u in EXPECTED_USERS[schema])
    assert unsup == expected
    # Each <|assistant_start|> is not supervised, each <|assistant_end|> is.
    for i, m in zip(ids, mask):
        if i == TOK.special_id("<|assistant_start|>"):
            assert m == 0
        if i == AEND:
            assert m == 1


def test_system_message_is_folded_into_first_user_turn() -> None:
    msgs = validate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Yo"}], max_chars=100)
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"] == "Be brief.\n\nHi"
    ids, mask = render_conversation(TOK, msgs)
    assert TOK.decode(ids) == "<|bos|><|user_start|>Be brief.\n\nHi<|user_end|><|assistant_start|>Yo<|assistant_end|>"
    # A prompt for generation ends by handing the turn to the assistant.
    prompt = render_prompt(TOK, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert TOK.decode(prompt) == "<|bos|><|user_start|>Be brief.\n\nHi<|user_end|><|assistant_start|>"


def test_unknown_schema_error_names_the_columns() -> None:
    with pytest.raises(ChatSchemaError) as e:
        detect_schema(["body", "title", "score"])
    assert "body" in str(e.value) and "title" in str(e.value) and "score" in str(e.value)


BAD_ROWS = [
    ({"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "fine"}]}, None),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": "a" * 60}, {"role": "assistant", "content": "x"}]}, "message_too_long"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles_not_alternating"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}, "roles_not_alternating"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "no_assistant_reply"),
    ({"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}, "unknown_role"),
    ({"messages": []}, "empty_conversation"),
    ({"messages": None}, "empty_conversation"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "malformed"),
    ({"messages": ["just a string"]}, "malformed"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}, "malformed"),
]


def test_every_bad_row_is_counted_with_its_reason() -> None:
    report = DropReport(name="t")
    kept = list(normalize_rows((r for r, _ in BAD_ROWS), max_chars=50, report=report))
    assert len(kept) == 1
    expected: dict[str, int] = {}
    for _, reason in BAD_ROWS:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert dict(report.dropped) == expected
    assert report.rows_in == len(BAD_ROWS) and report.rows_kept == 1
    assert report.rows_kept + report.rows_dropped == report.rows_in
    # Examples point at the offending rows.
    assert report.examples["message_too_long"][0].startswith("row 2")
    assert "roles_not_alternating=2" in report.summary()
    # Truncation that leaves no assistant token drops the conversation with its own reason.
    long_user = [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "a"}]
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rep2 = DropReport(rows_in=2, rows_kept=2)
    r = render_many(TOK, [long_user, short], vocab_size=TOK.vocab_size, max_tokens=20, report=rep2)
    assert len(r) == 1 and rep2.dropped["no_supervised_tokens"] == 1 and rep2.truncated == 1
    assert rep2.rows_kept == 1
    # Streamed through normalize_rows, a drop at render time names its source row.
    rep3 = DropReport()
    rows = [{"messages": short}, {"messages": [{"role": "user", "content": ""}]}, {"messages": long_user}]
    r = render_many(TOK, normalize_rows(iter(rows), 100, rep3), vocab_size=TOK.vocab_size, max_tokens=20, report=rep3)
    assert len(r) == 1 and rep3.rows_kept == 1 and rep3.rows_dropped == 2
    assert rep3.examples["no_supervised_tokens"][0].startswith("row 2")


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_load_conversations_reads_parquet_of_each_schema(tmp_path: Path) -> None:
    share = _write_parquet(tmp_path / "share.parquet", [SCHEMA_ROWS["sharegpt"]] * 3 + [
        {"conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"}]}])
    convs, report, schema = load_conversations(str(share), max_rows=None, max_chars=100, name="share")
    assert schema == "sharegpt" and len(convs) == 3 and report.dropped == {"roles_not_alternating": 1}
    alpaca = _write_parquet(tmp_path / "alpaca.parquet", [SCHEMA_ROWS["alpaca"], {"instruction": "Hi", "input": "", "output": "Yo"}])
    convs, report, schema = load_conversations(str(alpaca), max_rows=None, max_chars=100, name="alpaca")
    assert schema == "alpaca" and convs[1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    bad = _write_parquet(tmp_path / "bad.parquet", [{"body": "x", "title": "y"}])
    with pytest.raises(ChatSchemaError, match="body"):
        load_conversations(str(bad), max_rows=None, max_chars=100, name="bad")
    # max_rows caps what is read.
    convs, report, _ = load_conversations(str(share), max_rows=2, max_chars=100, name="share")
    assert report.rows_in == 2 and len(convs) == 2


def test_shared_chat_val_renders_with_exact_masks(shared_data: Path) -> None:
    convs, report, schema = load_conversations(str(shared_data / "chat" / "val.parquet"), max_rows=200,
                                               max_chars=20_000, name="val")
    assert schema == "smoltalk" and report.rows_in == 200 and len(convs) == report.rows_kept
    r = render_many(TOK, convs, vocab_size=TOK.vocab_size)
    assert len(r) == len(convs)
    for i in range(len(r)):
        ids, mask = r.conversation(i)
        replies = [m["content"] for m in convs[i] if m["role"] == "assistant"]
        assert supervised_spans(list(ids), list(mask)) == [x + "<|assistant_end|>" for x in replies]
