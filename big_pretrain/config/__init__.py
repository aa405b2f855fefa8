"""Configs: every key's default (defaults.py), their validation, run once (validation.py)."""
