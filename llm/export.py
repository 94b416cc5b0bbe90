"""Take a model out of Kiln: a Hugging Face directory that ``transformers`` loads, with no custom code
whenever transformers' own NanoChat architecture expresses the model, else with Kiln's own code.

    kiln export --checkpoint artifacts/sft/<key> --format hf --output DIR [--force] [--push-to-hub REPO]

and the pipeline stage ``export`` (after SFT), whose output directory is such a directory. It holds:

* ``config.json``: transformers' own NanoChat architecture (``model_type: nanochat``);
* ``model.safetensors``: the weights under NanoChat's parameter names;
* ``tokenizer.json`` + ``tokenizer_config.json``: the same ids as Kiln's tiktoken runtime, the special
  tokens, and ``chat_template.jinja``, which renders a conversation exactly as SFT saw it (and marks the
  tokens SFT supervised through ``{% generation %}``, so ``return_assistant_tokens_mask`` gives SFT's mask);
* ``generation_config.json``: stops on ``<|assistant_end|>`` (end of a reply) or ``<|bos|>`` (start of
  the next document), samples like ``kiln chat``;
* ``README.md``: a model card with the lineage (stage keys and manifest hashes back to the download),
  the tokens trained per stage, CORE and bits per byte.

Why NanoChat, checked detail by detail against ``llm/model.py`` (and proved by tests/test_export.py:
logits within 1e-4, the same greedy tokens):

* rotary: both rotate the pair (i, i + hd/2) (half split, not interleaved) with inverse frequency
  ``base^(-2i/hd)`` over all of ``head_dim``, and the same sign (NanoChat's ``rotate_half`` is flipped
  to match nanochat): ``rope_parameters = {"rope_type": "default", "rope_theta": rope_base}``;
* norms: parameter-free RMSNorm on both sides (NanoChat's has no weight), placed identically: after the
  embedding, before attention and before the MLP of every block, before ``lm_head``, and on q and k
  *after* rotary. Kiln calls ``F.rms_norm`` with no eps, which is ``finfo(float32).eps`` for fp32
  activations, so ``rms_norm_eps`` is that (NanoChat's default 1e-6 would move small activations);
* attention: scaled by ``head_dim**-0.5`` (SDPA's default), causal, no biases anywhere; grouped-query
  heads map query head h to kv head ``h // (n_heads / n_kv_heads)`` in both;
* MLP: ``fc2(relu(fc1(x))²)`` with a 4× hidden size: ``hidden_act = "relu2"``;
* head: untied from the embedding; logits soft-capped ``c·tanh(x/c)``: ``final_logit_softcapping``
  (None when Kiln's ``softcap`` is 0, which Kiln treats as no cap).

A model with an architecture option outside that list (sliding-window attention, ``window_pattern``
with S layers; any field of ``GPTConfig`` away from its default) is never exported as NanoChat, which
would silently drop the feature. It gets a remote-code export instead (``export.remote_code``, the
default): ``config.json`` with ``model_type: kiln`` and an ``auto_map``, ``configuration_kiln.py`` and
``modeling_kiln.py`` (from llm/hf_remote/) and ``kiln_gpt.py``, which is ``llm/model.py`` itself, copied
byte for byte; so the exported network is Kiln's code, not a second implementation that can drift. It
loads with ``trust_remote_code=True``, and the model card says which option needs it. With
``remote_code`` off such a model is refused, naming the option.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.stages.output import StageError, StageOutput

FORMATS = ("hf",)
DTYPES = ("float32", "bfloat16")
CARD_FILE = "README.md"
# What a Hugging Face model directory written here contains; `--force` replaces exactly these names.
# The remote-code export's Python files: transformers' wrappers (shipped from llm/hf_remote/) and the
# model itself (llm/model.py, under the name the wrapper imports).
REMOTE_CODE_DIR = Path(__file__).parent / "hf_remote"
REMOTE_WRAPPERS = ("configuration_kiln.py", "modeling_kiln.py")
REMOTE_MODEL_FILE = "kiln_gpt.py"
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", CARD_FILE, *REMOTE_WRAPPERS, REMOTE_MODEL_FILE)

# GPTConfig fields NanoChat expresses (see the module docstring for how each maps). Any other field in a
# checkpoint's model_config is an architecture option this export cannot write: refused, by name.
NANOCHAT_FIELDS = frozenset({"vocab_size", "depth", "aspect_ratio", "head_dim", "n_kv_heads", "seq_len",
                             "softcap", "rope_base"})

# Kiln parameter name -> NanoChatForCausalLM parameter name. A Kiln weight matching none of these is a
# part of the model NanoChat has no place for, and is refused rather than dropped.
WEIGHT_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"^wte\.weight$", "model.embed_tokens.weight"),
    (r"^blocks\.(\d+)\.attn\.c_q\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.c_k\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.c_v\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^blocks\.(\d+)\.attn\.c_proj\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^blocks\.(\d+)\.mlp\.c_fc\.weight$", r"model.layers.\1.mlp.fc1.weight"),
    (r"^blocks\.(\d+)\.mlp\.c_proj\.weight$", r"model.layers.\1.mlp.fc2.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
))

# Kiln's conversation format (llm/chat/format.py: render_conversation / render_prompt) as a Jinja template:
# <|bos|>, then <|user_start|>…<|user_end|> and <|assistant_start|>…<|assistant_end|> turns, a leading
# system message folded into the first user turn after a blank line, <|assistant_start|> to hand the
# turn to the model. The {% generation %} span is what SFT supervised: the reply and its end token.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if loop.first and system is not none -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{{- message['content'] + '<|user_end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if loop.first and system is not none -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}{%- endif -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- generation -%}{{- message['content'] + '<|assistant_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('unknown role ' + message['role'] + ': Kiln chat models know user, assistant and a leading system') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


class ExportError(StageError):
    """A checkpoint, tokenizer or output directory that cannot be exported as asked."""


# --------------------------------------------------------------------------- the architecture


def inexpressible(model_config: dict[str, Any]) -> dict[str, Any]:
    """The architecture options (name -> value) of a checkpoint's model_config that NanoChat cannot express.

    A ``GPTConfig`` field outside NANOCHAT_FIELDS is fine at its default, which by Kiln's rule is the model
    before that option existed (and so NanoChat's); a window pattern is fine when every layer comes out
    full (e.g. "S" on one layer, which is always full). Anything else, unknown fields included, is not.
    """
    from dataclasses import MISSING, fields

    from llm.model import GPTConfig

    defaults = {f.name: f.default for f in fields(GPTConfig) if f.default is not MISSING}
    out = {}
    for name in sorted(set(model_config) - NANOCHAT_FIELDS):
        value = model_config[name]
        if name == "window_pattern":
            if any(w is not None for w in GPTConfig.from_dict(model_config).layer_windows()):
                out[name] = value
        elif name not in defaults or value != defaults[name]:
            out[name] = value
    return out


def check_expressible(model_config: dict[str, Any], where: str) -> None:
    """Refuse, naming it, any architecture option NanoChat cannot express (before loading any weight)."""
    extra = inexpressible(model_config)
    if extra:
        opts = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise ExportError(f"{where}: architecture option {opts} cannot be expressed by transformers' nanochat "
                          f"architecture (it expresses {', '.join(sorted(NANOCHAT_FIELDS))}); not exporting a "
                          "model that would differ (export.remote_code=true writes Kiln's own code for "
                          "trust_remote_code instead)")


def kiln_config(cfg: Any, specials: dict[str, int], dtype: str) -> dict[str, Any]:
    """``config.json`` of a remote-code export: Kiln's GPTConfig whole under ``kiln`` (what the model is
    built from), transformers' usual names beside it (what tools read), and where the code is."""
    return {
        "architectures": ["KilnForCausalLM"],
        "model_type": "kiln",
        "auto_map": {"AutoConfig": "configuration_kiln.KilnConfig",
                     "AutoModelForCausalLM": "modeling_kiln.KilnForCausalLM"},
        "kiln": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.model_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.seq_len,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": specials["<|bos|>"],
        "eos_token_id": specials["<|assistant_end|>"],
        "pad_token_id": specials["<|bos|>"],
        "dtype": dtype,
    }


def write_remote_code(dest: Path) -> None:
    """The wrappers, and llm/model.py itself as ``kiln_gpt.py`` (it imports only torch and the standard
    library, so it runs wherever transformers does)."""
    from llm import model as kiln_model

    for name in REMOTE_WRAPPERS:
        shutil.copyfile(REMOTE_CODE_DIR / name, dest / name)
    shutil.copyfile(kiln_model.__file__, dest / REMOTE_MODEL_FILE)


def kiln_weights(state: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Kiln's state dict under ``model.`` (KilnForCausalLM holds Kiln's GPT as ``model``), in ``dtype``."""
    import torch

    return {f"model.{k}": t.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, t in state.items()}


def nanochat_config(cfg: Any, specials: dict[str, int], dtype: str) -> dict[str, Any]:
    """``config.json`` for a :class:`llm.model.GPTConfig` (see the module docstring for each field)."""
    import torch

    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.model_dim,
        "intermediate_size": 4 * cfg.model_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.seq_len,
        "hidden_act": "relu2",
        "rms_norm_eps": float(torch.finfo(torch.float32).eps),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "final_logit_softcapping": float(cfg.softcap) if cfg.softcap and cfg.softcap > 0 else None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": specials["<|bos|>"],
        "eos_token_id": specials["<|assistant_end|>"],
        "pad_token_id": specials["<|bos|>"],
        "dtype": dtype,
    }


def nanochat_weights(state: dict[str, Any], dtype: str, where: str) -> dict[str, Any]:
    """Kiln's state dict under NanoChat's names, contiguous, in ``dtype``."""
    import torch

    out: dict[str, Any] = {}
    unknown = []
    for name, tensor in state.items():
        for pattern, repl in WEIGHT_NAMES:
            if pattern.match(name):
                out[pattern.sub(repl, name)] = tensor.detach().to("cpu", getattr(torch, dtype)).contiguous()
                break
        else:
            unknown.append(name)
    if unknown:
        raise ExportError(f"{where}: weights {unknown[:5]} have no place in transformers' nanochat architecture")
    return out


# --------------------------------------------------------------------------- the tokenizer


def _bytes_to_hf(b: bytes) -> str:
    from llm.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def hf_tokenizer_from_ranks(tok: Any) -> Any:
    """An HF byte-level BPE with the same ids as a tiktoken-backed :class:`llm.tokenizer.Tokenizer`.

    Used when the tokenizer output has no ``hf_tokenizer.json`` (a stock tiktoken encoding, an older
    output). tiktoken merges the adjacent pair whose concatenation has the lowest rank; an HF merge list
    holding every split of every token, ordered by the merged token's rank, makes the same choice, and
    ``ignore_merges`` takes a whole pre-token that is itself a token at once, as tiktoken does.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    ranks: dict[bytes, int] = tok.mergeable_ranks()
    vocab = {_bytes_to_hf(b): r for b, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for b, r in ranks.items():
        for i in range(1, len(b)):
            left, right = b[:i], b[i:]
            if left in ranks and right in ranks:
                merges.append((r, ranks[left], ranks[right], _bytes_to_hf(left), _bytes_to_hf(right)))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(tok.encoding._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    by_id = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in by_id])
    return hf


def load_hf_tokenizer(tokenizer_uri: str, endpoint_url: str = "") -> tuple[Any, Any]:
    """(Kiln Tokenizer, HF ``tokenizers.Tokenizer`` with the same ids): the tokenizer stage's own
    ``hf_tokenizer.json`` when it wrote one (the trained model itself), else one built from the ranks."""
    from tokenizers import Tokenizer as HFTokenizer

    from llm.storage import Store, join
    from llm.tokenizer import HF_TOKENIZER_FILE, load_tokenizer

    tok = load_tokenizer(tokenizer_uri, endpoint_url)
    hf = None
    if not tokenizer_uri.startswith("tiktoken:"):
        where = join(tokenizer_uri, HF_TOKENIZER_FILE)
        store = Store(tokenizer_uri, endpoint_url)
        if store.exists(where):
            try:
                hf = HFTokenizer.from_file(str(store.cache_path(where)))
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for bad JSON
                raise ExportError(f"{where}: cannot read the HF tokenizer ({e})") from e
    if hf is None:
        hf = hf_tokenizer_from_ranks(tok)
    wrong = {s: (hf.token_to_id(s), i) for s, i in tok.special_tokens.items() if hf.token_to_id(s) != i}
    if wrong:
        raise ExportError(f"{tokenizer_uri}: HF tokenizer special token ids differ from Kiln's (HF, Kiln): {wrong}")
    return tok, hf


def transformers_tokenizer(tok: Any, hf: Any) -> Any:
    """A transformers fast tokenizer: BOS first on every encoded text (as every Kiln document starts),
    eos = ``<|assistant_end|>``, pad = BOS (what SFT pads with), and Kiln's chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from llm.tokenizer import BOS

    hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                                      special_tokens=[(BOS, tok.bos_id)])
    out = PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=BOS, eos_token="<|assistant_end|>", pad_token=BOS)
    out.chat_template = CHAT_TEMPLATE
    return out


# --------------------------------------------------------------------------- the model card


@dataclass
class CardInfo:
    """What the model card says about where the model came from and how good it is."""

    source: str = ""                                         # the checkpoint exported
    lineage: list[dict[str, Any]] = field(default_factory=list)  # {"depth", "role", "stage", "key", "hash"}
    tokens: dict[str, int] = field(default_factory=dict)     # training stage -> tokens trained
    evaluation: dict[str, Any] = field(default_factory=dict)  # {"core_label", "core", "bpb", "uri"}
    preset: str = ""


def card_info(model_uri: str, tokenizer_uri: str = "", *, root: str | None = None, eval_uri: str | None = None,
              endpoint_url: str = "", preset: str = "") -> CardInfo:
    """Lineage, tokens and scores from the manifests around the model (a stage output, or a checkpoint
    inside one) and the tokenizer; a bare checkpoint outside any stage output adds no lineage."""
    from llm.stages.output import lineage
    from llm.stages.output import read_manifest
    from llm.storage import Store

    store = Store(root or model_uri, endpoint_url)
    info = CardInfo(source=model_uri, preset=preset)
    seen: set[tuple[str, str]] = set()
    for role, uri in (("model", model_uri), ("tokenizer", tokenizer_uri)):
        stage_uri = _stage_output_of(store, uri) if uri and not uri.startswith("tiktoken:") else None
        if stage_uri is None:
            continue
        for depth, label, m in lineage(store, stage_uri, root=root):
            if m is None or (m.get("stage"), m.get("key")) in seen:
                continue
            seen.add((m.get("stage"), m.get("key")))
            info.lineage.append({"depth": depth, "role": label.split(": ", 1)[0] if depth else role,
                                 "stage": m.get("stage"), "key": m.get("key"), "hash": m.get("hash")})
            if m.get("stage") in ("pretrain", "midtrain", "sft") and (m.get("counts") or {}).get("tokens"):
                info.tokens.setdefault(m["stage"], int(m["counts"]["tokens"]))
    if eval_uri:
        m = read_manifest(store, eval_uri)
        if m is None:
            raise ExportError(f"{eval_uri}: not an eval stage output (no manifest.json)")
        counts = m.get("counts") or {}
        info.evaluation = {"core_label": m.get("core_label", "CORE"), "core": counts.get("core"),
                           "bpb": counts.get("bpb"), "key": m.get("key"), "hash": m.get("hash")}
    return info


def _stage_output_of(store: Any, uri: str) -> str | None:
    """``uri`` or the stage output directory holding it (``<stage>/<key>/final``, ``…/checkpoints/step_*``)."""
    from llm.stages.output import read_manifest

    parts = uri.rstrip("/").split("/")
    for k in range(3):
        if len(parts) - k < 1:
            break
        cand = "/".join(parts[: len(parts) - k])
        try:
            if read_manifest(store, cand) is not None:
                return cand
        except Exception:  # noqa: BLE001 - a neighbour's unreadable manifest: not this model's
            continue
    return None


def _card_usage(remote: dict[str, Any]) -> list[str]:
    """How to load the model: stock transformers, or with ``trust_remote_code=True`` and why."""
    arg = ", trust_remote_code=True" if remote else ""
    if remote:
        opts = ", ".join(f"`{k}={v!r}`" for k, v in remote.items())
        why = (f"It needs `trust_remote_code=True`: its architecture option {opts} (`window_pattern`: "
               "sliding-window attention; `value_embeds`, `smear`, `backout`: nanochat HEAD's newer recipe pieces) "
               "is one transformers' NanoChat cannot express, so the directory ships "
               "Kiln's own model code: `kiln_gpt.py` is Kiln's `llm/model.py` byte for byte, wrapped for "
               "transformers by `modeling_kiln.py` and `configuration_kiln.py`. Read them before trusting them. "
               "`generate` runs with transformers' KV cache; padded batches are refused (one sequence at a time).")
    else:
        why = "It runs on transformers' own NanoChat architecture: no `trust_remote_code` needed."
    return [why, "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"model = AutoModelForCausalLM.from_pretrained(DIR{arg})", "tokenizer = AutoTokenizer.from_pretrained(DIR)",
            'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,',
            '                                    return_tensors="pt", return_dict=True)',
            "out = model.generate(**ids, max_new_tokens=64)", "```", "",
            f"Scoring with lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=DIR,add_bos_token=True"
            f"{',trust_remote_code=True' if remote else ''} --tasks arc_easy`"
            f"{' (`--batch_size 1` for generation tasks, which pad)' if remote else ''}.", ""]


def model_card(info: CardInfo, cfg: Any, meta: dict[str, Any], dtype: str, remote: dict[str, Any] | None = None) -> str:
    """``README.md``: YAML front matter for the hub, then usage, architecture, training and lineage."""
    windows = [w for w in cfg.layer_windows() if w is not None]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- kiln",
             "- custom_code" if remote else "- nanochat",
             "---", "", f"# Kiln model{f' ({info.preset})' if info.preset else ''}", "",
             f"The {meta.get('stage') or 'final'} checkpoint (step {meta.get('step')}) of a model trained end to end "
             "with Kiln, exported with `kiln export --format hf`.", "", *_card_usage(remote or {}),
             "## Architecture", "",
             f"depth {cfg.depth}, width {cfg.model_dim}, {cfg.n_heads} query heads / {cfg.kv_heads} key-value heads of "
             f"{cfg.head_dim}, context {cfg.seq_len}, vocabulary {cfg.vocab_size}; rotary (base {cfg.rope_base:g}), "
             f"QK-norm, ReLU² MLP, untied head, logit soft-cap {cfg.softcap:g}; weights in {dtype}."
             + (f" Sliding-window attention `{cfg.window_pattern}`: {len(windows)} of {cfg.depth} layers see the "
                f"last {windows[0]} tokens before each token, the others (the last included) the whole context."
                if windows else ""), "",
             "The tokenizer gives every text a leading `<|bos|>`, as every training document had; the chat template "
             "renders conversations exactly as Kiln's SFT saw them. Special-token names typed inside message text "
             "(`<|user_end|>` ...) are read as those tokens by transformers, whereas Kiln encoded such text literally.",
             ""]
    lines += ["## Training", ""]
    if info.tokens:
        order = [s for s in ("pretrain", "midtrain", "sft") if s in info.tokens]
        lines += ["| stage | tokens |", "| --- | ---: |"] + [f"| {s} | {info.tokens[s]:,} |" for s in order]
        lines += [f"| total | {sum(info.tokens.values()):,} |", ""]
    else:
        lines += [f"Checkpoint step {meta.get('step')}, {meta.get('tokens', 'unknown')} tokens "
                  "(no stage manifests found around it).", ""]
    lines += ["## Evaluation", ""]
    ev = info.evaluation
    if ev:
        core = f"{ev['core']:.4f}" if isinstance(ev.get("core"), (int, float)) else "n/a"
        bpb = f"{ev['bpb']:.4f}" if isinstance(ev.get("bpb"), (int, float)) else "n/a"
        lines += ["| metric | value |", "| --- | ---: |", f"| {ev['core_label']} | {core} |",
                  f"| bits per byte | {bpb} |", "", f"From Kiln's eval stage output `{ev.get('key')}` "
                  f"(manifest hash `{ev.get('hash')}`).", ""]
    else:
        lines += ["Not evaluated by Kiln's eval stage before export.", ""]
    lines += ["## Lineage", "", f"Exported from `{info.source}`."]
    if info.lineage:
        lines += ["Every Kiln stage output this model was made from, back to the download: the key names the "
                  "config and inputs, the manifest hash the exact files.", "",
                  "| stage | role | key | manifest hash |", "| --- | --- | --- | --- |"]
        # Depth as a visible prefix: markdown tables drop leading spaces.
        lines += [f"| {'· ' * r['depth']}{r['stage']} | {r['role'] or '-'} | `{r['key']}` | `{r['hash']}` |"
                  for r in info.lineage]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing


def write_hf_dir(dest: Path, checkpoint_uri: str, tokenizer_uri: str, *, card: CardInfo, dtype: str = "float32",
                 endpoint_url: str = "", remote_code: bool = True) -> dict[str, Any]:
    """Write the Hugging Face directory into ``dest`` (an empty scratch directory); returns a summary.

    The checkpoint's architecture is checked from its meta: NanoChat when it expresses the model, else
    Kiln's own code (or, with ``remote_code`` off, a refusal naming the option). Then every file is
    verified (size and SHA-256, by ``load_model``) before a weight is used; a failure names the file.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from llm.checkpoint import load_model, read_meta, resolve_checkpoint_dir

    if dtype not in DTYPES:
        raise ExportError(f"export dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint_dir(checkpoint_uri, endpoint_url=endpoint_url)
    meta = read_meta(ckpt)
    needs_code = inexpressible(meta.get("model_config") or {})
    if needs_code and not remote_code:
        check_expressible(meta.get("model_config") or {}, str(ckpt / "meta.json"))
    tok, hf = load_hf_tokenizer(tokenizer_uri, endpoint_url)
    model, meta = load_model(str(ckpt))
    cfg = model.config
    if cfg.vocab_size < tok.vocab_size:
        raise ExportError(f"{ckpt}: model vocabulary {cfg.vocab_size} is smaller than tokenizer {tokenizer_uri}'s "
                          f"{tok.vocab_size}: not the tokenizer this model was trained with")
    dest.mkdir(parents=True, exist_ok=True)
    if needs_code:
        config, weights = kiln_config(cfg, tok.special_tokens, dtype), kiln_weights(model.state_dict(), dtype)
        write_remote_code(dest)
    else:
        config, weights = nanochat_config(cfg, tok.special_tokens, dtype), nanochat_weights(model.state_dict(), dtype, str(ckpt))
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    params = model.num_params()
    del model
    transformers_tokenizer(tok, hf).save_pretrained(str(dest))
    specials = tok.special_tokens
    GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=[specials["<|assistant_end|>"], tok.bos_id],
                     pad_token_id=tok.bos_id, do_sample=True, temperature=0.6, top_k=50,
                     max_new_tokens=256).save_pretrained(str(dest))
    (dest / CARD_FILE).write_text(model_card(card, cfg, meta, dtype, needs_code), encoding="utf-8")
    return {"architecture": "kiln" if needs_code else "nanochat", "remote_code": bool(needs_code), "dtype": dtype, "checkpoint": str(ckpt), "step": meta.get("step"),
            "params": params, "model_config": cfg.to_dict()}


def check_output_dir(output: Path, force: bool) -> None:
    """A non-empty output directory is refused unless ``force``; checked before any work."""
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportError(f"{output}: output directory is not empty; pass --force to write into it "
                          f"(replacing {', '.join(HF_FILES)})")


def export_to_dir(checkpoint_uri: str, tokenizer_uri: str, output: Path, *, force: bool = False,
                  card: CardInfo | None = None, dtype: str = "float32", endpoint_url: str = "",
                  remote_code: bool = True) -> dict[str, Any]:
    """``kiln export``: write into a scratch directory beside ``output``, then move the files in, so an
    interrupted export leaves no half-written model under ``output``."""
    check_output_dir(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = write_hf_dir(tmp, checkpoint_uri, tokenizer_uri, card=card or CardInfo(source=checkpoint_uri),
                               dtype=dtype, endpoint_url=endpoint_url, remote_code=remote_code)
        output.mkdir(exist_ok=True)
        written = {p.name for p in tmp.iterdir()}
        for name in set(HF_FILES) - written:  # a forced stock export over a remote-code one: no stale code
            (output / name).unlink(missing_ok=True)
        for p in sorted(tmp.iterdir()):
            os.replace(p, output / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------- upload


def push_to_hub(folder: Path, repo: str, *, token: str | None = None, endpoint: str | None = None,
                private: bool = False) -> str:
    """Upload ``folder`` to the hub model repo ``repo`` with ``huggingface_hub.upload_folder``.

    The token comes from ``HF_TOKEN`` (never from the command line, where it would land in shell
    history and process lists) and is never printed: errors are re-raised with it masked.
    """
    from huggingface_hub import HfApi

    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ExportError(f"--push-to-hub {repo}: set HF_TOKEN to a hub token with write access")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                 commit_message="Upload a model exported by kiln export",
                                 ignore_patterns=["manifest.json", ".*"])
    except Exception as e:  # noqa: BLE001 - the hub client's errors come in many types
        detail = " ".join(str(e).replace(token, "***").split())  # one line, the token masked
        raise ExportError(f"--push-to-hub {repo}: upload failed ({type(e).__name__}: {detail})") from None
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------- the stage


def key_extras(cfg: Any) -> dict[str, Any]:
    """The preset names the model in its card (and in the MLflow registry), so it is part of what this
    stage produces; the run seed is not."""
    return {"preset": cfg.preset}


def run(cfg: Any, out: StageOutput, inputs: dict[str, dict], *, progress: bool) -> dict[str, Any]:
    """Registry stage "export": inputs "model" (sft output), "tokenizer", optional "eval" (for the card)."""
    for role in ("model", "tokenizer"):
        if role not in inputs:
            raise StageError(f"export needs a {role!r} input")
    ecfg = cfg.export
    if ecfg.format not in FORMATS:
        raise ExportError(f"export.format={ecfg.format!r}: expected one of {', '.join(FORMATS)}")
    model_uri = inputs["model"]["uri"]
    card = card_info(model_uri, inputs["tokenizer"]["uri"], root=cfg.run.artifact_root,
                     eval_uri=(inputs.get("eval") or {}).get("uri"), endpoint_url=cfg.run.s3_endpoint, preset=cfg.preset)
    summary = write_hf_dir(out.workdir, model_uri, inputs["tokenizer"]["uri"], card=card, dtype=ecfg.dtype,
                           endpoint_url=cfg.run.s3_endpoint, remote_code=ecfg.remote_code)
    size = sum(p.stat().st_size for p in out.workdir.iterdir() if p.is_file())
    registered = register_in_mlflow(cfg, out, model_uri, card)
    if progress:
        print(f"[export] {ecfg.format} ({summary['architecture']}, {ecfg.dtype}) -> {out.uri}", flush=True)
        if registered:
            print(f"[export] MLflow model {registered['name']} version {registered['version']} "
                  f"(alias {registered['alias']})", flush=True)
    return {"counts": {"files": sum(1 for p in out.workdir.iterdir() if p.is_file()), "bytes": size,
                       "tokens_trained": sum(card.tokens.values()) or None,
                       "core": card.evaluation.get("core"), "bpb": card.evaluation.get("bpb")},
            "format": ecfg.format, "architecture": summary["architecture"], "remote_code": summary["remote_code"],
            "dtype": ecfg.dtype,
            "model_config": summary["model_config"], "mlflow_registered": registered}


def register_in_mlflow(cfg: Any, out: StageOutput, model_uri: str, card: CardInfo) -> dict[str, Any] | None:
    """Register the exported SFT model as a version of ``kiln-<preset>`` with its lineage in the tags.

    Best effort, like all of Kiln's MLflow logging: a tracking server that is down must not fail an export
    whose files are fine. Returns {"name", "version", "alias", "model_id"}, or None.
    """
    from llm.storage import is_s3
    from llm.tracking import (CURRENT_ALIAS, logged_model_of_checkpoint, register_model_version,
                              registered_model_name, tracking_uri)

    try:
        from mlflow.tracking import MlflowClient

        uri = tracking_uri(cfg.run.mlflow_tracking_uri)
        client = MlflowClient(tracking_uri=uri)
        model_id = logged_model_of_checkpoint(client, model_uri, cfg.run.s3_endpoint)
        run_id = client.get_logged_model(model_id).source_run_id if model_id else None
        where = out.uri if is_s3(out.uri) else os.path.abspath(out.uri)
        tags = {"kiln.preset": cfg.preset, "kiln.format": cfg.export.format, "kiln.export_uri": where,
                "kiln.lineage": json.dumps([[r["stage"], r["key"], r["hash"]] for r in card.lineage])}
        for r in card.lineage:
            tags.setdefault(f"kiln.lineage.{r['stage']}", f"{r['key']} {r['hash']}")
        for k in ("core", "bpb"):
            if card.evaluation.get(k) is not None:
                tags[f"kiln.{k}"] = str(card.evaluation[k])
        stage_run = os.environ.get("KILN_MLFLOW_RUN_ID")  # set when the Prefect pipeline runs this stage
        if stage_run:
            tags["kiln.export_run_id"] = stage_run
            parent = client.get_run(stage_run).data.tags.get("mlflow.parentRunId")
            if parent:
                tags["kiln.pipeline_run_id"] = parent
        name = registered_model_name(cfg.preset)
        version = register_model_version(uri, name, source=where, model_id=model_id, run_id=run_id, tags=tags,
                                         identity=("kiln.export_key", out.key),
                                         description=f"Kiln export {out.key}: a transformers directory at {where}")
        return {"name": name, "version": str(version.version), "alias": CURRENT_ALIAS, "model_id": model_id}
    except Exception as e:  # noqa: BLE001 - see the docstring
        print(f"[export] MLflow registration skipped ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a training stage output dir (uses final/) or a checkpoint dir")
    p.add_argument("--format", default="hf", choices=FORMATS, help="hf: a transformers model directory (default)")
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the model directory")
    p.add_argument("--force", action="store_true", help="write into a non-empty DIR, replacing files of the same names")
    p.add_argument("--tokenizer", default=None, help="tokenizer URI (default: the checkpoint's manifest input)")
    p.add_argument("--eval", dest="eval_uri", default=None, metavar="URI",
                   help="an eval stage output of this model, for CORE and bpb in the model card")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weight dtype (default float32, as trained)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="then upload DIR to this hub model repo (token from HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the hub repo private")
    p.add_argument("--no-remote-code", dest="remote_code", action="store_false",
                   help="refuse a model NanoChat cannot express instead of shipping Kiln's code for trust_remote_code")
    p.add_argument("--s3-endpoint", default="", help="S3-compatible endpoint for s3:// URIs")


def main(args: argparse.Namespace) -> int:
    from llm.cli.chat import find_tokenizer_uri
    from llm.checkpoint import read_meta, resolve_checkpoint_dir
    from llm.stages.output import root_of
    from llm.storage import Store

    output = Path(args.output)
    check_output_dir(output, args.force)  # before anything is read
    if args.push_to_hub and not os.environ.get("HF_TOKEN"):
        raise ExportError(f"--push-to-hub {args.push_to_hub}: set HF_TOKEN to a hub token with write access")
    store = Store(args.checkpoint, args.s3_endpoint)
    tok_uri = args.tokenizer
    if tok_uri is None:
        meta = read_meta(resolve_checkpoint_dir(args.checkpoint, endpoint_url=args.s3_endpoint))
        tok_uri = find_tokenizer_uri(args.checkpoint, store, meta)
    stage_uri = _stage_output_of(store, args.checkpoint)
    card = card_info(args.checkpoint, tok_uri, root=root_of(stage_uri) if stage_uri else None,
                     eval_uri=args.eval_uri, endpoint_url=args.s3_endpoint)
    summary = export_to_dir(args.checkpoint, tok_uri, output, force=args.force, card=card, dtype=args.dtype,
                            endpoint_url=args.s3_endpoint, remote_code=args.remote_code)
    code = ", loads with trust_remote_code=True" if summary["remote_code"] else ""
    print(f"kiln export: {summary['checkpoint']} (step {summary['step']}) -> {output} "
          f"({summary['architecture']}, {summary['dtype']}{code})")
    if args.push_to_hub:
        url = push_to_hub(output, args.push_to_hub, private=args.private)
        print(f"kiln export: pushed to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `kiln export` is the entry point
    parser = argparse.ArgumentParser(prog="kiln export")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
