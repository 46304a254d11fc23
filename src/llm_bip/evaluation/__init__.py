"""Evaluation: perplexity and zero-shot accuracy."""
