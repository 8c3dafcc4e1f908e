"""The napari-ar3d training core: I/O, data, models, objectives, training, inference.

Never imports napari or Qt.
"""

__version__ = "0.1.0"
