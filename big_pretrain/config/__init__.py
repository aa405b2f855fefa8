"""A training stage's config: its keys gathered from the modules that declare them
(defaults.py), their validation, run once before anything compiles (validation.py), and
recorded configs brought to today's schema (upgrade.py)."""
