"""CORE scoring: known answers for the three task types, gold oracle, centering, determinism, ranks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from _eval_fakes import ByteTokenizer, OracleScorer, alphabet_scorer, gold_texts, write_bundle
from llm.eval.bundle import BundleError, load_bundle, load_task_data
from llm.eval.core import (build_request, centered_accuracy, core_csv, evaluate_core, fewshot_indices,
                           prepare_data)

TOK = ByteTokenizer()

# Under alphabet_scorer (loss = |next - cur - 1|) the answers below are worked out by hand in the comments.
MC_ROWS = [
    # continuation = the choice only (common prefix "ab"): "cdz" -> (0+0+21)/3 = 7, "q" -> 14 => 0.
    # A sum of losses would pick "q" (21 > 14), scoring the prefix too would change the means.
    {"query": "ab", "choices": ["cdz", "q"], "gold": 0},
    {"query": "ab", "choices": ["q", "cdz"], "gold": 0},  # predicts 1: wrong
]
SCHEMA_ROWS = [
    # common suffix "bcd": after "xa" costs 0, after "xyz" costs (25+0+0)/3 => option "xa"
    {"context_options": ["xa", "xyz"], "continuation": "bcd", "gold": 0},
    {"context_options": ["xa", "xyz"], "continuation": "bcd", "gold": 1},  # wrong
    {"context_options": ["xyz", "xa"], "continuation": "bcd", "gold": 1},
]
LM_ROWS = [
    {"context": "abc ", "continuation": "defg"},  # correct only if the context's trailing space is trimmed
    {"context": "abc", "continuation": "xyz"},  # first token wrong
    {"context": "abc", "continuation": "defh"},  # last token wrong
    {"context": "mn", "continuation": "o"},  # correct
]


@pytest.fixture()
def hand_bundle(tmp_path: Path):
    root = write_bundle(tmp_path / "bundle", [
        {"label": "mc", "type": "multiple_choice", "delimiter": "", "rows": MC_ROWS},
        {"label": "sch", "type": "schema", "delimiter": "", "rows": SCHEMA_ROWS},
        {"label": "lm", "type": "language_modeling", "delimiter": "", "rows": LM_ROWS},
    ], {"mc": 25, "sch": 50, "lm": 0})
    return load_bundle(str(root))


@pytest.mark.parametrize("mode", [dict(), dict(per_example=True), dict(batch_tokens=1)])
def test_known_answers_for_all_three_task_types(hand_bundle, mode):
    res = evaluate_core(alphabet_scorer, TOK, hand_bundle, **mode)
    acc = {k: t.accuracy for k, t in res.tasks.items()}
    assert acc == {"mc": pytest.approx(1 / 2), "sch": pytest.approx(2 / 3), "lm": pytest.approx(2 / 4)}
    assert res.tasks["mc"].centered == pytest.approx((0.5 - 0.25) / 0.75)
    assert res.tasks["sch"].centered == pytest.approx((2 / 3 - 0.5) / 0.5)
    assert res.tasks["lm"].centered == pytest.approx(0.5)
    assert res.core == pytest.approx(((0.25 / 0.75) + (1 / 3) + 0.5) / 3)
    assert res.n_tasks == 3 and res.examples == 9
    assert res.label.startswith("CORE-3 (")  # never called plain "CORE"


def test_gold_oracle_scores_one_on_hand_made_tasks(tmp_path: Path):
    # Unambiguous items (no two share a prompt), golds in every position, default delimiter " ".
    mc = [{"query": f"Question {i}:", "choices": ["red", "green", "blue"], "gold": i % 3} for i in range(6)]
    sch = [{"context_options": [f"Tom {i} ate", f"Ann {i} ran"], "continuation": "fast.", "gold": i % 2} for i in range(4)]
    lm = [{"context": f"Count {i} to", "continuation": f"{i + 1} {i + 2}"} for i in range(5)]
    bundle = load_bundle(str(write_bundle(tmp_path / "b", [
        {"label": "mc", "type": "multiple_choice", "rows": mc},
        {"label": "sch", "type": "schema", "rows": sch},
        {"label": "lm", "type": "language_modeling", "rows": lm},
    ], {"mc": 33, "sch": 50, "lm": 0})))
    golds = []
    for task in bundle.tasks:
        rows = load_task_data(bundle, task)
        golds += [[TOK.bos_id, *TOK.encode(t)] for t in gold_texts(task.task_type, rows, task.delimiter)]
    res = evaluate_core(OracleScorer(golds), TOK, bundle)
    assert {k: t.accuracy for k, t in res.tasks.items()} == {"mc": 1.0, "sch": 1.0, "lm": 1.0}
    assert res.core == 1.0


def test_gold_oracle_scores_one_on_real_zero_shot_tasks(shared_data):
    bundle = load_bundle(str(shared_data / "core_eval"))
    labels = ["copa", "winograd", "lambada_openai"]  # one 0-shot task of each type
    golds = []
    for label in labels:
        task = bundle.task(label)
        rows = prepare_data(load_task_data(bundle, task), 12)
        golds += [[TOK.bos_id, *TOK.encode(t)] for t in gold_texts(task.task_type, rows, task.delimiter)]
    res = evaluate_core(OracleScorer(golds), TOK, bundle, tasks=labels, max_per_task=12)
    assert {k: (t.accuracy, t.centered, t.n) for k, t in res.tasks.items()} == {k: (1.0, 1.0, 12) for k in labels}
    assert res.core == 1.0


def test_centering():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.5, 0.25) == pytest.approx(1 / 3)
    assert centered_accuracy(0.1, 0.5) == pytest.approx(-0.8)  # below chance is negative


def test_fewshot_prompts_are_deterministic_and_use_delimiter_and_bos(shared_data):
    bundle = load_bundle(str(shared_data / "core_eval"))
    task = bundle.task("arc_easy")  # 10-shot, delimiter "\nAnswer: "
    data = prepare_data(load_task_data(bundle, task), 30)
    a = build_request(task, data, 7, TOK)
    b = build_request(task, data, 7, TOK)
    assert a == b
    shots = fewshot_indices(7, len(data), 10)
    assert len(set(shots)) == 10 and 7 not in shots
    # the same draws as sampling from the explicit list of other indices
    assert shots == random.Random(1234 + 7).sample([i for i in range(len(data)) if i != 7], 10)
    text = TOK.decode(a.seqs[0])
    assert a.seqs[0][0] == TOK.bos_id
    assert text.count("\nAnswer: ") == 11 and text.count("\n\n") >= 10
    assert text.startswith(data[shots[0]]["query"] + "\nAnswer: " + data[shots[0]]["choices"][data[shots[0]]["gold"]])
    assert text.endswith(data[7]["query"] + "\nAnswer: " + data[7]["choices"][0])
    # MC continuation starts after the common prefix: the shared part decodes to the prompt.
    assert TOK.decode(a.seqs[0][: a.starts[0]]).endswith("\nAnswer: ") or a.starts[0] < len(a.seqs[0])


def test_max_per_task_is_a_fixed_seeded_subset():
    rows = [{"i": i} for i in range(100)]
    sub = prepare_data(rows, 10)
    expect = list(rows)
    random.Random(1337).shuffle(expect)
    assert sub == expect[:10] and prepare_data(rows, 10) == sub
    assert len(prepare_data(rows, None)) == 100


def test_long_sequences_are_cropped_from_the_left(hand_bundle):
    task = hand_bundle.task("lm")
    data = load_task_data(hand_bundle, task)
    r = build_request(task, data, 0, TOK, max_seq_len=5)
    assert len(r.seqs[0]) == 5 and TOK.decode(r.seqs[0]).endswith("defg")
    assert r.ends[0] == 5 and r.starts[0] == 1
    res = evaluate_core(alphabet_scorer, TOK, hand_bundle, max_seq_len=6)
    assert res.tasks["lm"].accuracy == 0.5


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path):
    root = write_bundle(tmp_path / "b", [{"label": "lm", "type": "language_modeling", "rows": LM_ROWS}], {"lm": 0})
    path = root / "eval_data" / "misc" / "lm.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, '{"context": "abc", "continuation": ')
    path.write_text("\n".join(lines) + "\n")
    bundle = load_bundle(str(root))
    with pytest.raises(BundleError, match=rf"{path}:3: malformed JSON"):
        evaluate_core(alphabet_scorer, TOK, bundle)
    lines[2] = '{"context": "abc"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleError, match=r"lm\.jsonl:3: missing field\(s\) \['continuation'\]"):
        load_task_data(bundle, bundle.task("lm"))


def test_bad_gold_index_is_reported(tmp_path: Path):
    rows = [{"query": "q", "choices": ["a", "b"], "gold": 2}]
    root = write_bundle(tmp_path / "b", [{"label": "mc", "type": "multiple_choice", "rows": rows}], {"mc": 50})
    bundle = load_bundle(str(root))
    with pytest.raises(BundleError, match=r"mc\.jsonl:1: field 'gold' = 2"):
        load_task_data(bundle, bundle.task("mc"))


def test_core_csv_lists_every_task_and_the_core_row(hand_bundle):
    res = evaluate_core(alphabet_scorer, TOK, hand_bundle)
    lines = core_csv(res).splitlines()
    assert lines[0] == "task,type,shots,n,accuracy,centered"
    assert [ln.split(",")[0] for ln in lines[1:4]] == ["mc", "sch", "lm"]
    assert lines[-1].startswith(res.label) and lines[-1].endswith(f"{res.core:.6f}")


# --------------------------------------------------------------------------- a real (tiny, random) GPT


def _tiny_gpt(seed: int = 0, seq_len: int = 256, **options):
    """A random GPT whose every weight is non-zero (the training init zeroes the residual projections,
    which would make attention, and so the prompt cache, irrelevant to the scores). ``options`` are
    architecture options (value embeddings, smear, backout, sliding windows); their scalar gates are set
    non-zero too, so each one carries signal through the cache."""
    from llm.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, depth=2, aspect_ratio=32, head_dim=16, seq_len=seq_len,
                          **options)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p is not model.wte.weight:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
            elif p.dim() < 2:
                p.fill_(0.5)
    return model


REAL_TASKS = ["copa", "winograd", "lambada_openai", "arc_easy"]


def _run_gpt_core(shared_data: Path, state: dict, batch_tokens: int = 4096, per_example: bool = False):
    from llm.eval.core import model_scorer

    model = _tiny_gpt()
    model.load_state_dict(state)
    bundle = load_bundle(str(shared_data / "core_eval"))
    return evaluate_core(model_scorer(model), TOK, bundle, tasks=REAL_TASKS, max_per_task=4,
                         batch_tokens=batch_tokens, per_example=per_example, max_seq_len=1024)


def _rank_worker(rank: int, world: int, store_file: str, shared_data: str, state_path: str, out_path: str) -> None:
    import torch.distributed as dist

    # A file rendezvous, not a port picked in the parent and bound here seconds later (another process
    # could take it in between).
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        res = _run_gpt_core(Path(shared_data), torch.load(state_path))
        if rank == 0:
            torch.save({k: (t.accuracy, t.n) for k, t in res.tasks.items()} | {"core": res.core}, out_path)
        dist.barrier()  # both ranks done, the result written
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave as the eval and train jobs do: a gloo teardown after the peer has gone can SIGABRT a
    # finished rank (llm/dist.py), and mp.spawn would report that as a failure.
    from llm.dist import finish

    finish(0)


@pytest.fixture()
def one_thread():
    """One intra-op thread, as each rank below has: the comparison is then about ranks, not thread counts."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_identical_across_runs_batching_and_one_vs_two_ranks(shared_data, tmp_path: Path, one_thread):
    import torch.multiprocessing as mp

    state = _tiny_gpt().state_dict()
    a = _run_gpt_core(shared_data, state)
    b = _run_gpt_core(shared_data, state)
    plain = _run_gpt_core(shared_data, state, per_example=True)
    summary = lambda r: {k: (t.accuracy, t.n) for k, t in r.tasks.items()} | {"core": r.core}  # noqa: E731
    assert summary(a) == summary(b) == summary(plain)
    assert all(t.n == 4 for t in a.tasks.values())

    state_path, out_path = tmp_path / "state.pt", tmp_path / "two_ranks.pt"
    torch.save(state, state_path)
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rendezvous"), str(shared_data), str(state_path), str(out_path)),
             nprocs=2, join=True)
    assert torch.load(out_path) == summary(a)


# --------------------------------------------------------------------------- the shared-prompt fast path


# One task of each type and shot count; at 384 tokens the 10-shot byte-level prompts are cropped, each
# choice by a different amount, so those share nothing (and must still score right). 4096 crops none.
FAST_TASKS = ["arc_easy", "copa", "hellaswag_zeroshot", "winograd", "winogrande", "lambada_openai", "jeopardy"]
FAST_CASES = [(label, 4096) for label in FAST_TASKS] + [("arc_easy", 384), ("jeopardy", 384)]


# Every architecture option on (window 128 at seq_len 512: the 10-shot prompts run past it).
ALL_OPTIONS = dict(value_embeds=True, smear=True, backout=True, window_pattern="SL")
FAST_CASES = [(label, max_len, {}) for label, max_len in FAST_CASES] + [
    ("arc_easy", 4096, ALL_OPTIONS), ("hellaswag_zeroshot", 4096, ALL_OPTIONS), ("lambada_openai", 4096, ALL_OPTIONS)]


@pytest.mark.parametrize("label,max_len,options", FAST_CASES)
def test_shared_prompt_path_scores_like_full_sequences(shared_data, label, max_len, options, one_thread):
    """Per sequence: the same scored tokens, the same losses (fp tolerance) and argmax, the same verdicts."""
    from llm.eval.core import _judge, _score_packed, _score_shared, model_scorer, shared_prefix_length

    bundle = load_bundle(str(shared_data / "core_eval"))
    task = bundle.task(label)
    data = prepare_data(load_task_data(bundle, task), 12)
    requests = [build_request(task, data, i, TOK, max_seq_len=max_len) for i in range(6)]
    scorer = model_scorer(_tiny_gpt(seq_len=512 if options else 1024, **options))
    full = _score_packed(scorer, requests, TOK.bos_id, 1 << 30, per_example=True)
    # the two fast paths: one cached prompt per example, and packed batches with logits only where read
    packed = _score_packed(scorer, requests, TOK.bos_id, 3000, per_example=False)
    shared = 0
    for req, ref, pk in zip(requests, full, packed):
        fast = _score_shared(scorer, req, TOK.bos_id)
        shared += shared_prefix_length(req)
        for got in (fast, pk):
            for (fl, fp, ft), (rl, rp, rt) in zip(got, ref, strict=True):
                assert ft.tolist() == rt.tolist() and len(ft) > 0
                assert fl == pytest.approx(rl, rel=1e-4, abs=1e-4)
                assert fp.tolist() == rp.tolist()
            assert _judge(task.task_type, req, got) == _judge(task.task_type, req, ref)
    if max_len == 4096:
        assert shared > len(requests)  # the prompts really are shared beyond BOS


def test_schema_options_of_different_lengths_share_only_the_common_prompt():
    """Contexts of different lengths before a common continuation: suffixes are right-padded, prompt shared."""
    from llm.eval.bundle import TaskSpec
    from llm.eval.core import _score_packed, _score_shared, model_scorer

    task = TaskSpec("s", "s.jsonl", "schema", 2, " ", 0.5)
    data = [{"context_options": [f"Row {i} the cat", f"Row {i} a much longer dog story"], "continuation": "sat.",
             "gold": i % 2} for i in range(5)]
    req = build_request(task, data, 0, TOK)
    assert req.starts[0] != req.starts[1] and req.ends[0] != req.ends[1]
    scorer = model_scorer(_tiny_gpt(1))
    fast, ref = _score_shared(scorer, req, TOK.bos_id), _score_packed(scorer, [req], TOK.bos_id, 1 << 30, True)[0]
    for (fl, fp, ft), (rl, rp, rt) in zip(fast, ref):
        assert ft.tolist() == rt.tolist() == TOK.encode(" sat.")
        assert fl == pytest.approx(rl, rel=1e-4, abs=1e-4) and fp.tolist() == rp.tolist()
