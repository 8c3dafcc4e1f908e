"""Checkpoints: the typed config.json (`config`), the folder on disk (`store`) and its description (`card`)."""
