"""Named linear-probe protocols: how taps are pooled, how images are prepared, and how the probes train.

``"paper"`` is the protocol of the authors' probe code (yukimasano/linear-probes, ``eval_linear_probes.py``,
after Zhang et al. 2017) as used by Asano et al. (ICLR 2020, §4 "Evaluation"), with the author's answer for
CIFAR in that repository's issue #3 ("resize the CIFAR images to 256 and take a 224 crop"):

* fixed max-pools after each post-ReLU tap: conv1 6/6 pad 3, conv2 4/4, conv3 and conv4 3/3 pad 1, conv5 2/2
  (9600, 9216, 9600, 9600, 9216 dims for the ImageNet AlexNet at 224 px);
* BatchNorm without affine, then a linear layer (Xavier init, zero bias);
* SGD momentum 0.9, weight decay 1e-5, learning rate 0.01 divided by 10 at epochs 10, 20 and 30, 36 epochs,
  batch 192;
* train: random-resized crop (scale 0.08-1, aspect 3/4-4/3) to 224 and horizontal flip; test: resize to 256 and
  centre crop 224.

``"cifar"`` is the package's CPU-scale protocol at the trunk's own input size (32/64 px): every tap max-pooled to
the non-overlapping window landing nearest ``target_dims`` (about 9k, :func:`~keras_oneimage.probes.linear.pooling_for`),
pad-and-crop plus flip on train, plain resize on test; the same optimiser and schedule.

``"coarse"`` is the ``"cifar"`` protocol with every tap pooled to about 1k dims instead of 9k (conv1 of the
32 px cifar stem: a 3x3 grid of its 96 channels), so that the probe cannot read the pixels back through conv1;
experiments/probe_study.py compares the protocols (experiments/RESULTS.md, "Probe protocol study").

Other trunks: a fixed table only covers the taps it names (the paper's is AlexNet's ``conv1`` … ``conv5``). Every
other tap, e.g. ResNet-18's ``stem``, ``stage1`` … ``stage4``, gets the rule of the ``"cifar"`` protocol in every
protocol: the non-overlapping max-pool landing nearest the protocol's ``target_dims``, so a ResNet tap is probed on
the same ~9k (or ~1k) dimension budget as an AlexNet tap. At 224 px under ``"paper"`` that is stem 9/9 → 12x12x64,
stage1 5/5 pad 2 → 12x12x64, stage2 3/3 → 9x9x128, stage3 2/2 → 7x7x256, stage4 2/2 pad 1 → 4x4x512; at 32 px
(cifar stem) 3/3 pad 1 → 11x11x64 for stem and stage1, 2/2 pad 1 → 9x9x128, 2/2 pad 1 → 5x5x256, none → 4x4x512.
Every ResNet tap is post-ReLU, so zero padding equals the -inf padding of the paper's code there as well.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from keras_oneimage.errors import InputError


@dataclasses.dataclass(frozen=True)
class ProbeProtocol:
    """One probe protocol. Fields left ``None`` fall back to the trunk (``image_size``) or to ``target_dims``."""

    name: str
    #: Fixed ``(size, stride, padding)`` max-pool per tap; ``None``: the window nearest ``target_dims``.
    pooling: Mapping[str, tuple[int, int, int]] | None = None
    target_dims: int = 9216
    #: ``"pad_crop_flip"`` (CIFAR-style) or ``"resized_crop_flip"`` (ImageNet-style random-resized crop).
    train_transform: str = "pad_crop_flip"
    #: Side images are resized to before a centre crop of ``image_size`` at test time; ``None``: resize only.
    eval_resize: int | None = None
    #: Probe input side; ``None``: the trunk's ``image_size``.
    image_size: int | None = None
    epochs: int = 36
    decay_epochs: tuple[int, ...] = (10, 20, 30)
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 192

    def resolve(self, **given) -> dict:
        """``given`` (``epochs``, ``batch_size``, ``learning_rate``, ``weight_decay``) with every ``None`` replaced
        by this protocol's value: explicit arguments win over the protocol."""
        return {name: getattr(self, name) if value is None else value for name, value in given.items()}


#: The paper's fixed pooling after each tap, (size, stride, padding), from the authors' probe code.
PAPER_POOLING = {
    "conv1": (6, 6, 3),
    "conv2": (4, 4, 0),
    "conv3": (3, 3, 1),
    "conv4": (3, 3, 1),
    "conv5": (2, 2, 0),
}

PROTOCOLS: dict[str, ProbeProtocol] = {
    "cifar": ProbeProtocol("cifar"),
    "coarse": ProbeProtocol("coarse", target_dims=1024),
    "paper": ProbeProtocol(
        "paper", pooling=PAPER_POOLING, train_transform="resized_crop_flip", eval_resize=256, image_size=224
    ),
}
DEFAULT_PROTOCOL = "cifar"


def get_protocol(protocol: str | ProbeProtocol | None) -> ProbeProtocol:
    """The :class:`ProbeProtocol` named ``protocol`` (``None``: the default), or ``protocol`` itself."""
    if protocol is None:
        return PROTOCOLS[DEFAULT_PROTOCOL]
    if isinstance(protocol, ProbeProtocol):
        return protocol
    if isinstance(protocol, str) and protocol in PROTOCOLS:
        return PROTOCOLS[protocol]
    raise InputError(f"unknown probe protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
