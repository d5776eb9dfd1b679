"""Scoring models on held-out text: perplexity, in-context examples, experiments."""
