"""Evaluation: the successive protocol, ranking, metrics and their tables."""
