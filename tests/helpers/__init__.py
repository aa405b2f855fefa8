"""Helpers shared by the test files, each defined once.

tiny_config: the tiny stage configs the tests train, and their trainers.
numerics: comparing float32 results of two computation orders.
eval_counting: what an evaluator reads of a held-out split.
"""
