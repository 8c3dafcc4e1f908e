"""Qt / magicgui widgets of napari-ar3d; installed as ``napari_ar3d.widgets``."""
