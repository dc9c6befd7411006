"""Workflows that train or extract across backbones: `compare` (every backbone × strategy cell), `recipe` (a
classic experiment) and `select` (rank candidate backbones on the user's data).

They sit above training, evaluation and reporting and call them; nothing below imports them.
"""
