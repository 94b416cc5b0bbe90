"""Evaluation: CORE (llm.eval.core), bits-per-byte (llm.eval.loss), samples, and the eval stage (llm.eval.stage)."""
