"""napari-ar3d: an autoregressive 3D encoder for CT and MRI in napari.

This module stays light: importing it (or opening napari) must not import torch.
Every napari command lives in a submodule that is imported only when napari calls it.
"""

__version__ = "0.1.0"
