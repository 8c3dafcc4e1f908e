"""Reading and writing volumes with their geometry.

`volume`: NIfTI, NRRD, MHA/MHD and DICOM series to a `Volume` (array + RAS affine) and back, atomic
writes, class names beside label maps, napari <-> RAS geometry.
"""
