"""Checkpoints: the typed config.json (`config`), files named by name and sha256 in its provenance
(`provenance`), the folder on disk (`store`) and its description (`card`)."""
