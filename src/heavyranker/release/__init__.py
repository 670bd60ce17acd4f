"""Releasing models: gated promotion of a checkpoint into the model repository (promote.py), above eval
(whose paired bootstrap it uses) and serve (whose export and repository it uses)."""
