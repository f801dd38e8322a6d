"""Scoring models on token blocks (perplexity, KL), zero-shot accuracy through lm-eval, and the report
rendered for people."""
