"""Evaluation: CORE (llm.eval.core), bits-per-byte (llm.eval.bpb), samples, and the eval stage (llm.eval.stage)."""
