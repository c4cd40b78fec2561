"""Export frozen early layers as versioned, TF-Serving-ready SavedModels (see ``docs/serving.md``)."""
from keras_oneimage.export.savedmodel import (
    BYTES_SIGNATURE,
    DEFAULT_SIGNATURE,
    METADATA_FILE,
    SIGNATURES,
    UINT8_SIGNATURE,
    export,
    find_min_size,
    numeric_versions,
    read_metadata,
)

__all__ = [
    "BYTES_SIGNATURE",
    "DEFAULT_SIGNATURE",
    "METADATA_FILE",
    "SIGNATURES",
    "UINT8_SIGNATURE",
    "export",
    "find_min_size",
    "numeric_versions",
    "read_metadata",
]
