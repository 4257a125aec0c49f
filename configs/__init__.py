"""Experiment configurations: `default.py`, and one file per dataset that imports it."""
