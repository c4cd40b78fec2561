"""Probe the trunk while it trains: a Keras callback logging per-layer probe accuracy every few epochs.

Asano et al. (ICLR 2020) report linear-probe accuracy per conv layer; watching it during self-supervised training
shows when the early layers stop improving. The numbers land in ``logs`` as ``probe_conv1`` … (``knn_conv1`` … for
``kind="knn"``), hence in ``History`` and ``CSVLogger`` (place this callback *before* ``CSVLogger``), and, with
``log_dir``, in TensorBoard as ``probe/conv1`` ….

On epochs it skips, the keys are still written with ``NaN`` so ``CSVLogger`` (which fixes its columns at the first
epoch) keeps them. Defaults are a cheap monitor on the ``val`` split (4 probe epochs), not the paper's 36-epoch
protocol: report final numbers with :func:`keras_oneimage.probes.linear.probe` on ``test``.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import keras
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.data.labelled import LabelledData
from keras_oneimage.errors import InputError
from keras_oneimage.probes.knn import knn_probe
from keras_oneimage.probes.linear import BATCH_SIZE, LEARNING_RATE, as_labelled, check_layers, probe

KINDS = ("linear", "knn")


class ProbeCallback(keras.callbacks.Callback):
    """Runs linear (or kNN) probes on ``self.model.backbone`` every ``every`` epochs and logs their accuracy.

    Args:
        data: the labelled data (a :class:`LabelledData`, or a name/path for ``load_labelled``).
        every: probe after every ``every``-th epoch (epochs ``every``, ``2 * every``, … counted from 1).
        layers: taps to probe (default: every tap of the trunk, read from it when training starts).
        epochs: probe training epochs (linear probes only; a short monitor, the paper trains 36).
        batch_size, learning_rate, seed, image_size: passed to the probe.
        kind: ``"linear"`` (the paper's probes) or ``"knn"`` (training-free, cheaper).
        split: ``"val"`` (default: never monitor on test) or ``"test"``.
        log_dir: if given, also write ``probe/<layer>`` scalars there for TensorBoard (step = epoch number).
        backbone: the trunk to probe, when the trained model has no ``backbone`` attribute.
        verbose: print the accuracies after each probe.
    """

    def __init__(
        self,
        data: LabelledData | str | os.PathLike,
        *,
        every: int = 1,
        layers: Sequence[str] | None = None,
        epochs: int = 4,
        batch_size: int = BATCH_SIZE,
        learning_rate: float = LEARNING_RATE,
        seed: int = 0,
        image_size: int | None = None,
        kind: str = "linear",
        split: str = "val",
        log_dir: str | os.PathLike | None = None,
        backbone: keras.Model | None = None,
        verbose: int = 0,
    ):
        super().__init__()
        every = validation.positive_int("every", every)
        if kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if split not in ("val", "test"):
            raise InputError(f"split must be 'val' or 'test', got {split!r}")
        self.data = as_labelled(data)
        self.every = every
        self.layers = None if layers is None else (layers,) if isinstance(layers, str) else tuple(layers)
        self.kind = kind
        self.split = split
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.verbose = verbose
        self.prefix = "probe_" if kind == "linear" else "knn_"
        self._backbone = backbone
        self._options = {"batch_size": batch_size, "image_size": image_size}
        if kind == "linear":
            self._options.update(epochs=epochs, learning_rate=learning_rate, seed=seed)
        self._writer = None
        self.results: dict[int, dict[str, float]] = {}  # epoch (1-based) -> {layer: accuracy}

    @property
    def backbone(self):
        """The trunk being probed: the one given, else ``self.model.backbone``."""
        if self._backbone is not None:
            return self._backbone
        backbone = getattr(self.model, "backbone", None)
        if backbone is None:
            raise InputError(f"{type(self.model).__name__} has no .backbone to probe; pass ProbeCallback(backbone=)")
        return backbone

    def run(self) -> dict[str, float]:
        """Probe the trunk now; return ``{layer: accuracy}``."""
        if self.kind == "linear":
            return probe(self.backbone, self.data, layers=self.layers, split=self.split, verbose=0, **self._options)
        return knn_probe(self.backbone, self.data, layers=self.layers, split=self.split, **self._options)

    def on_train_begin(self, logs: dict | None = None) -> None:
        # The trunk names its taps; fixing them here keeps CSVLogger's columns the same on every epoch.
        self.layers = check_layers(self.backbone, self.layers)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        number = epoch + 1
        if self.layers is None:  # used outside Model.fit
            self.on_train_begin()
        if number % self.every:
            scores = {layer: math.nan for layer in self.layers}
        else:
            scores = self.run()
            self.results[number] = scores
            self._write_summaries(scores, number)
            if self.verbose:
                print(f"epoch {number} {self.kind} probes ({self.split}): "
                      + ", ".join(f"{layer} {acc:.3f}" for layer, acc in scores.items()))  # fmt: skip
        if logs is not None:
            logs.update({f"{self.prefix}{layer}": acc for layer, acc in scores.items()})

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_summaries(self, scores: dict[str, float], step: int) -> None:
        if self.log_dir is None:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        tag = "probe" if self.kind == "linear" else "knn"
        with self._writer.as_default():
            for layer, acc in scores.items():
                tf.summary.scalar(f"{tag}/{layer}", acc, step=step)
        self._writer.flush()
