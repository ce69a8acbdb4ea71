"""Validation: the prompts, rendering them with an adapter, and scoring the images."""
