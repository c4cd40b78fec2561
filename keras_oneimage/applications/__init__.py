"""Uses of the learned early layers beyond linear probes (Asano et al., ICLR 2020, §5 and the critique's issue 18).

``inversion``: reconstruct an image from its conv1 / conv2 features (Mahendran & Vedaldi, CVPR 2015), to see
what a single-image trunk keeps of an image beside a random and a supervised one.
"""
from keras_oneimage.applications.inversion import InversionRecord, invert_features, load_trunk, random_trunk

__all__ = ["InversionRecord", "invert_features", "load_trunk", "random_trunk"]
