"""`kiln chat`: talk to a trained model, one multi-turn conversation at a time.

    kiln chat --checkpoint artifacts/sft/<key> [--tokenizer URI] [--temperature 0.6] [--top-k 50]

Type a message and the reply streams back token by token. ``/clear`` starts a new
conversation, ``/quit`` (or end of input) leaves. Works with stdin not a terminal, so
``printf 'hi\\n/quit\\n' | kiln chat --checkpoint ...`` is a scriptable smoke test.

The tokenizer is ``--tokenizer`` when given, else the ``tokenizer`` input recorded in the
checkpoint's stage manifest (a training stage output knows which tokenizer it was trained with).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from llm.chat.format import ASSISTANT, USER, ChatSpecials, Message, render_prompt
from llm.stages.output import read_manifest
from llm.storage import Store, is_s3, local_path

COMMANDS_HELP = "commands: /clear (new conversation), /quit (leave)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a training stage output dir (uses final/) or a checkpoint dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer URI (default: the checkpoint's manifest input)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0 = all (default 50)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--system", default=None, help="a system prompt, folded into the first user turn")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint for s3:// URIs")


def _manifest_near(uri: str, store: Store) -> dict[str, Any] | None:
    """The stage manifest of ``uri`` or of a stage dir containing it (``<stage>/final``, ``checkpoints/step_*``)."""
    if not is_s3(uri):
        p = local_path(uri).resolve()
        candidates = [str(p), str(p.parent), str(p.parent.parent)]
    else:
        parts = uri.rstrip("/").split("/")
        candidates = ["/".join(parts[: len(parts) - k]) for k in range(3) if len(parts) - k > 3]
    for c in candidates:
        # read_manifest resolves the recorded inputs against where this manifest is now, so a root
        # that was moved or copied finds its own tokenizer whatever the current directory.
        try:
            m = read_manifest(store, c)
        except Exception:  # noqa: BLE001 - a corrupt manifest or an S3 error: not this candidate
            continue
        if m is not None:
            return m
    return None


def find_tokenizer_uri(checkpoint: str, store: Store, meta: dict[str, Any] | None = None) -> str:
    """The stage manifest's "tokenizer" input, else the tokenizer the trainer recorded in the checkpoint meta."""
    m = _manifest_near(checkpoint, store)
    tok = (m or {}).get("inputs", {}).get("tokenizer", {}).get("uri") or (meta or {}).get("tokenizer")
    if not tok:
        raise FileNotFoundError(
            f"cannot find the tokenizer for {checkpoint}: no stage manifest with a 'tokenizer' input next to it; "
            "pass --tokenizer URI")
    return tok


class StreamDecoder:
    """Turns a growing list of token ids into printable text increments.

    BPE tokens can split a UTF-8 character; decoding the whole reply each time and holding
    back a trailing replacement character avoids printing half a character.
    """

    def __init__(self, tok: Any):
        self.tok, self.ids, self.printed = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new, self.printed = text[len(self.printed):], text
        return new


class ChatSession:
    """History + generation for one conversation; separate from I/O so it is testable."""

    def __init__(self, model: Any, tok: Any, *, temperature: float, top_k: int | None, max_new_tokens: int,
                 system: str | None = None, seed: int | None = None):
        self.model, self.tok = model, tok
        self.sp = ChatSpecials.of(tok)
        self.temperature, self.top_k, self.max_new = temperature, top_k or None, max_new_tokens
        self.system, self.seed = system, seed
        # The trained context, not the (longer) rotary table: beyond seq_len the model has never been trained.
        self.context = int(model.config.seq_len)
        self.history: list[Message] = []
        self.turns = 0

    def clear(self) -> None:
        self.history = []

    def _prompt(self) -> list[int]:
        """Prompt ids, dropping the oldest exchanges while it leaves no room for a reply."""
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            ids = render_prompt(self.tok, msgs)
            if len(ids) + min(self.max_new, 32) <= self.context or len(self.history) <= 1:
                return ids[-(self.context - 1):] if len(ids) >= self.context else ids
            self.history = self.history[2:]

    def reply(self, user_text: str, out: TextIO) -> str:
        self.history.append({"role": USER, "content": user_text})
        ids = self._prompt()
        budget = max(1, min(self.max_new, self.context - len(ids)))
        stops = {self.sp.assistant_end, self.sp.bos, self.sp.user_start}
        dec = StreamDecoder(self.tok)
        seed = None if self.seed is None else self.seed + self.turns
        self.turns += 1
        for t in self.model.generate(ids, budget, temperature=self.temperature, top_k=self.top_k,
                                     seed=seed, stop_ids=stops):
            if t in stops:
                break
            piece = dec.push(t)
            if piece:
                out.write(piece)
                out.flush()
        out.write(dec.flush())
        text = dec.printed
        self.history.append({"role": ASSISTANT, "content": text if text.strip() else "…"})
        return text


def main(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from llm.checkpoint import load_model
    from llm.dist import resolve_device
    from llm.tokenizer import load_tokenizer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    store = Store(".", args.s3_endpoint)
    device = resolve_device(args.device, "--device")
    model, meta = load_model(args.checkpoint, device=device, endpoint_url=args.s3_endpoint)
    model.eval()
    tok_uri = args.tokenizer or find_tokenizer_uri(args.checkpoint, store, meta)
    tok = load_tokenizer(tok_uri, args.s3_endpoint)
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer {tok_uri} has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    session = ChatSession(model, tok, temperature=args.temperature, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, system=args.system, seed=args.seed)
    interactive = stdin.isatty()
    step = meta.get("step", "?") if isinstance(meta, dict) else "?"
    print(f"kiln chat: {args.checkpoint} (step {step}), tokenizer {tok_uri}. {COMMANDS_HELP}", file=sys.stderr)
    while True:
        if interactive:
            stdout.write("\nyou> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/clear":
            session.clear()
            stdout.write("[conversation cleared]\n")
            stdout.flush()
            continue
        if text.startswith("/"):
            stdout.write(f"[unknown command {text.split()[0]}; {COMMANDS_HELP}]\n")
            continue
        stdout.write("assistant> ")
        stdout.flush()
        session.reply(text, stdout)
        stdout.write("\n")
        stdout.flush()
    return 0
