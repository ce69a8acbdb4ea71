"""Validation: the prompts (prompts.py), rendering them with an adapter (render.py), CLIP scoring (clip.py),
and the records a validation leaves: images, grid and scores.json (results.py)."""
