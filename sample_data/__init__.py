"""Procedural phantoms with known labels; installed as ``napari_ar3d.sample_data``."""
