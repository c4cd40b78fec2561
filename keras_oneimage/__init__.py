"""keras-oneimage: learn the first layers of a CNN from one image.

Asano, Rupprecht & Vedaldi, "A critical analysis of self-supervision, or what we can learn from a single image",
ICLR 2020.
"""
__version__ = "0.1.0"
