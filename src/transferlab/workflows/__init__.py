"""Workflows that train: `compare` (every backbone × strategy cell) and `recipe` (a classic experiment).

They sit above training, evaluation and reporting and call them; nothing below imports them.
"""
