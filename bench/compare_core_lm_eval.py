"""ARC-Easy scored two ways on one exported model: Kiln's CORE evaluator and lm-evaluation-harness.

    .venv/bin/python bench/compare_core_lm_eval.py --checkpoint artifacts/sft/<key> \\
        --tokenizer artifacts/tokenizer/<key> --export DIR [--kit ../shared/data] [--n 200]

Both read the data kit's CORE bundle file (``core_eval/eval_data/world_knowledge/arc_easy.jsonl``) and the
same examples (CORE's shuffled, capped subset). Printed, for the same N examples:

* CORE as defined (10-shot, the choice with the lowest *mean* per-token loss over the tokens where the
  choices differ), and CORE's rule at 0-shot;
* lm-eval at 0-shot with the repo's task file (docs/lm_eval/kit_arc_easy.yaml: the same prompt text as
  CORE's 0-shot prompt): ``acc`` (highest *summed* log-likelihood) and ``acc_norm`` (summed, divided by the
  answer's length in bytes);
* CORE's rule applied to lm-eval's own log-likelihoods (mean over the answer's tokens): where it picks
  what Kiln's 0-shot CORE picks, the two harnesses score the export identically and any gap is the rule.

docs/lm_eval.md explains the differences with this script's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def kiln_core(checkpoint: str, tokenizer: str, kit: Path, n: int) -> dict:
    from llm.checkpoint import load_model
    from llm.eval.bundle import load_task_data, open_bundle
    from llm.eval.core import SHUFFLE_SEED, build_request, evaluate_task, model_scorer, prepare_data, score_requests
    from llm.tokenizer import load_tokenizer

    model, _ = load_model(checkpoint)
    tok = load_tokenizer(tokenizer)
    bundle = open_bundle(kit / "core_eval")
    task = bundle.task("arc_easy")
    rows = load_task_data(bundle, task)
    order = list(range(len(rows)))
    random.Random(SHUFFLE_SEED).shuffle(order)  # the rows prepare_data keeps, as file indices
    data = prepare_data(rows, n)
    max_len = int(model.rope_cos.shape[0])
    scorer = model_scorer(model)
    shot10 = evaluate_task(scorer, tok, task, data, max_seq_len=max_len)
    zero = dataclasses.replace(task, num_fewshot=0)
    reqs = [build_request(zero, data, i, tok, max_len) for i in range(len(data))]
    ok0 = score_requests(scorer, reqs, zero.task_type, tok.bos_id)
    # CORE scores from where the choices' tokens start to differ; lm-eval from the end of the question.
    shared = [r.starts[0] > _context_len(tok, data[r.idx]) for r in reqs]
    return {"indices": order[: len(data)], "data": data, "acc_10shot": shot10.accuracy, "ok_0shot": ok0,
            "shared_prefix": shared, "max_len": max_len}


def _context_len(tok, item: dict) -> int:
    """Tokens of BOS + "<query>\\nAnswer:": where lm-eval's answer starts."""
    return 1 + len(tok.encode(item["query"] + "\nAnswer:"))


def lm_eval_scores(export: str, kit: Path, indices: list[int], max_len: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(kit)
    try:
        res = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={export},add_bos_token=True,dtype=float32,max_length={max_len}",
            tasks=["kit_arc_easy"], task_manager=TaskManager(include_path=str(REPO / "docs" / "lm_eval")),
            # Sorted: lm-eval 0.4.13 walks the selected documents in file order and labels the k-th with
            # samples[k], so an unsorted list gets wrong doc_ids (the documents themselves are right).
            samples={"kit_arc_easy": sorted(indices)}, device="cpu", batch_size=8, log_samples=True)
    finally:
        os.chdir(cwd)
    by_doc = {s["doc_id"]: s for s in res["samples"]["kit_arc_easy"]}
    return {"results": res["results"]["kit_arc_easy"], "samples": [by_doc[i] for i in indices]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--export", required=True, help="the kiln export of --checkpoint")
    ap.add_argument("--kit", default=str(REPO.parent / "shared" / "data"), help="the data kit (holds core_eval/)")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    kit = Path(args.kit).resolve()
    kiln = kiln_core(args.checkpoint, args.tokenizer, kit, args.n)
    lm = lm_eval_scores(str(Path(args.export).resolve()), kit, kiln["indices"], kiln["max_len"])
    hf_tok = AutoTokenizer.from_pretrained(args.export)
    agree = core_rule_ok = disagree_unshared = 0
    for s, ok0, item, shared in zip(lm["samples"], kiln["ok_0shot"], kiln["data"], kiln["shared_prefix"]):
        assert s["doc"]["query"] == item["query"], "lm-eval and Kiln are not scoring the same item"
        lls = [r[0][0] for r in s["resps"]]
        context = s["doc"]["query"] + "\nAnswer:"
        n_ctx = len(hf_tok(context)["input_ids"])
        mean = [-ll / (len(hf_tok(context + " " + c)["input_ids"]) - n_ctx) for ll, c in zip(lls, s["doc"]["choices"])]
        pred = min(range(len(mean)), key=mean.__getitem__)
        correct = pred == s["doc"]["gold"]
        core_rule_ok += correct
        agree += correct == ok0
        disagree_unshared += correct != ok0 and not shared
    n = len(lm["samples"])
    out = {
        "n": n,
        "kiln_core_10shot_acc": kiln["acc_10shot"],
        "kiln_core_0shot_acc": sum(kiln["ok_0shot"]) / n,
        "lm_eval_0shot_acc": lm["results"]["acc,none"],
        "lm_eval_0shot_acc_norm": lm["results"]["acc_norm,none"],
        "core_rule_on_lm_eval_loglikelihoods_acc": core_rule_ok / n,
        "items_where_that_agrees_with_kiln_0shot": agree,
        "items_whose_choices_share_leading_tokens": sum(kiln["shared_prefix"]),
        "disagreements_on_items_whose_choices_do_not": disagree_unshared,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
