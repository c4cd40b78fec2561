"""Per-layer evaluation of a trunk: linear probes (the paper's protocol), kNN, and a callback for use during fit."""
from keras_oneimage.probes.callback import ProbeCallback
from keras_oneimage.probes.knn import knn_predict, knn_probe
from keras_oneimage.probes.linear import LinearProbes, PoolSpec, pooling_for, pooling_table, probe, probe_splits, probe_val

__all__ = [
    "LinearProbes",
    "PoolSpec",
    "ProbeCallback",
    "knn_predict",
    "knn_probe",
    "pooling_for",
    "pooling_table",
    "probe",
    "probe_splits",
    "probe_val",
]
