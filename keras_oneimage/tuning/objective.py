"""What a search maximises: one layer's validation probe accuracy, or the mean over several layers."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from keras_oneimage import validation
from keras_oneimage.errors import InputError


@dataclasses.dataclass(frozen=True)
class ProbeObjective:
    """``"conv2"`` (one layer's val accuracy) or ``"mean:conv1,conv2"`` (the mean over layers)."""

    spec: str
    layers: tuple[str, ...]
    name: str  # the Keras Tuner metric name

    @classmethod
    def parse(cls, spec: str, taps: tuple[str, ...] | None = None) -> "ProbeObjective":
        """``taps``: the trunk's tap names (default AlexNet's), which the trunk owns."""
        if taps is None:
            from keras_oneimage.models.alexnet import AlexNet

            taps = AlexNet.TAPS

        if not isinstance(spec, str) or not spec.strip():
            raise InputError(f"objective must be a layer name or 'mean:conv1,conv2', got {spec!r}")
        text = spec.strip()
        mean = text.startswith("mean:")
        names = tuple(s.strip() for s in text[len("mean:"):].split(",") if s.strip()) if mean else (text,)
        layers = validation.layer_names(names, taps, label=f"objective {spec!r}")
        layers = tuple(sorted(layers, key=taps.index))
        name = f"val_mean_{'_'.join(layers)}" if mean else f"val_{layers[0]}"
        return cls(f"mean:{','.join(layers)}" if mean else layers[0], layers, name)

    def value(self, scores: Mapping[str, float]) -> float:
        """The objective from per-layer val accuracies (the mean when several layers)."""
        return float(sum(float(scores[layer]) for layer in self.layers) / len(self.layers))
