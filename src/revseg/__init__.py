"""revseg: memory-efficient reversible networks for volumetric segmentation."""

__version__ = "0.1.0"
