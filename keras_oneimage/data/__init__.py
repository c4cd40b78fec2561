"""Source images in, endless augmented patch batches out (Asano et al., ICLR 2020, §3)."""
from keras_oneimage.data.augment import AugmentConfig, PatchSampler
from keras_oneimage.data.images import load_image, load_images
from keras_oneimage.data.pyramid import Pyramid, build_pyramid
from keras_oneimage.data.synthetic import patch_dataset

__all__ = ["AugmentConfig", "PatchSampler", "Pyramid", "build_pyramid", "load_image", "load_images", "patch_dataset"]
