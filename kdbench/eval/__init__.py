"""Evaluation: generate responses, score them (ROUGE-L, exact match, lm-eval)."""
