"""Evaluation: CORE (llm.eval.core), held-out loss and bits-per-byte (llm.eval.loss), greedy samples
(llm.eval.samples), and the eval stage (llm.eval.stage)."""
