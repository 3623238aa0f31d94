"""Evaluation: long-context tasks (tasks.py) and the claim suite C1-C10 (claims.py), run by evaluate.py."""
