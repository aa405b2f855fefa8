"""Configs: every key's default (defaults.py), the values each may take (value_rules.py),
their validation, run once (validation.py), and recorded configs brought to today's schema
(upgrade.py)."""
