"""Figures: the conv1 filter grid, image grids (BiGAN samples) and per-layer probe accuracy curves.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot), so it never changes the user's backend
and is safe from background threads. Files are written atomically (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import math
import os
import pathlib
import tempfile
from typing import Any, Mapping

import numpy as np

from keras_oneimage.errors import InputError

PathLike = str | os.PathLike


def _save(fig, path: PathLike) -> pathlib.Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=f".{fmt}")
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _mosaic(tiles: np.ndarray, ncols: int | None = None, pad: int = 1, fill: float = 1.0) -> np.ndarray:
    """``(N, h, w, C)`` → one ``(rows*(h+pad)+pad, cols*(w+pad)+pad, C)`` image, tiles row-major."""
    n, h, w, c = tiles.shape
    cols = ncols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y : y + h, x : x + w] = tiles[i]
    return out


def _normalise_each(tiles: np.ndarray) -> np.ndarray:
    """Scale every tile to [0, 1] on its own (constant tiles become mid-grey)."""
    flat = tiles.reshape(tiles.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (flat - lo[:, None]) / span[:, None]
    out[hi <= lo] = 0.5
    return out.reshape(tiles.shape).astype(np.float32)


def _conv2d_full(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Full 2-D convolution of two small kernels (true convolution; used to compose Sobel with conv1)."""
    ha, wa = a.shape
    hb, wb = b.shape
    out = np.zeros((ha + hb - 1, wa + wb - 1), dtype=np.float64)
    for i in range(hb):
        for j in range(wb):
            out[i : i + ha, j : j + wa] += b[i, j] * a
    return out


def _conv1_kernel(model) -> tuple[np.ndarray, object]:
    backbone = getattr(model, "backbone", model)
    try:
        block = backbone.get_layer("conv1")
    except (ValueError, AttributeError):
        raise InputError("conv1_filter_grid needs an AlexNet (or a method model with .backbone)") from None
    conv = getattr(block, "conv", block)
    if not getattr(conv, "built", False):
        raise InputError("the model is not built yet; call it on a batch before plotting its conv1 filters")
    return np.asarray(conv.kernel, dtype=np.float64), backbone


def sobel_effective_filters(kernel: np.ndarray) -> np.ndarray:
    """conv1 filters on Sobel input ``(k, k, 2, N)`` as luminance filters ``(N, k+2, k+2)`` in pixel space.

    conv1 sees the (x, y) Sobel gradients of the grayscale image, so each filter's effect on the image is the sum
    over the two channels of (Sobel kernel ⊛ channel weights). Cross-correlations on both sides: the composite
    kernel is the full convolution of the conv1 slice with the Sobel kernel, in correlation orientation.
    """
    from keras_oneimage.models.sobel import sobel_kernel

    sobel = sobel_kernel().sum(axis=2)  # (3, 3, 2): gray weights sum to 1
    n = kernel.shape[-1]
    out = []
    for f in range(n):
        # corr(corr(img, s), w) = corr(img, conv_full(s, w)) with conv_full the true convolution of s and w.
        out.append(sum(_conv2d_full(sobel[:, :, c], kernel[:, :, c, f]) for c in range(kernel.shape[2])))
    return np.stack(out).astype(np.float32)


def conv1_filter_mosaic(model) -> np.ndarray:
    """The conv1 filters of ``model`` (an AlexNet, or a method with ``.backbone``) as one ``(H, W, C)`` mosaic.

    Each filter is normalised to [0, 1] on its own (as in the paper's Fig. 3). RGB-input filters are shown in
    colour; for a Sobel-input conv1 (DeepCluster) each filter is composed with the fixed Sobel front end and shown
    as the grayscale filter it applies to the image.
    """
    kernel, backbone = _conv1_kernel(model)
    cin = kernel.shape[2]
    if cin == 2 and getattr(backbone, "sobel", False):
        tiles = sobel_effective_filters(kernel)[..., None]
    else:
        tiles = np.transpose(kernel, (3, 0, 1, 2))  # (N, k, k, C)
        if cin not in (1, 3):
            tiles = tiles.mean(axis=-1, keepdims=True)
    return _mosaic(_normalise_each(tiles))


def _show(ax, mosaic: np.ndarray, title: str | None) -> None:
    ax.imshow(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)


def conv1_filter_grid(model, path: PathLike, *, title: str | None = None) -> pathlib.Path:
    """Save the conv1 filters of ``model`` as a grid image (see :func:`conv1_filter_mosaic`)."""
    from matplotlib.figure import Figure

    mosaic = conv1_filter_mosaic(model)
    side = max(2.0, min(12.0, mosaic.shape[1] / 12))
    fig = Figure(figsize=(side, side * mosaic.shape[0] / mosaic.shape[1] + (0.4 if title else 0)))
    _show(fig.add_subplot(), mosaic, title)
    return _save(fig, path)


def conv1_filter_comparison(models: Mapping[str, Any], path: PathLike) -> pathlib.Path:
    """Save the conv1 filter grids of several models side by side, one titled panel each (paper Fig. 3)."""
    from matplotlib.figure import Figure

    if not models:
        raise ValueError("conv1_filter_comparison needs at least one model")
    fig = Figure(figsize=(3.2 * len(models), 3.6))
    for i, (name, model) in enumerate(models.items()):
        _show(fig.add_subplot(1, len(models), i + 1), conv1_filter_mosaic(model), name)
    return _save(fig, path)


def image_grid(images, path: PathLike, title: str | None = None, *, ncols: int | None = None) -> pathlib.Path:
    """Save a batch of images ``(N, H, W, C)`` (float in [0, 1] or uint8; C = 1 or 3) as one grid image."""
    from matplotlib.figure import Figure

    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[0] == 0 or arr.shape[-1] not in (1, 3):
        raise InputError(f"image_grid expects a non-empty (N, H, W, 1|3) batch, got shape {arr.shape}")
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else np.clip(arr.astype(np.float32), 0.0, 1.0)
    mosaic = _mosaic(arr, ncols=ncols, pad=2)
    side = max(3.0, min(14.0, mosaic.shape[1] / 40))
    fig = Figure(figsize=(side, side * mosaic.shape[0] / mosaic.shape[1] + (0.4 if title else 0)))
    ax = fig.add_subplot()
    ax.imshow(mosaic[..., 0] if mosaic.shape[-1] == 1 else mosaic, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def layer_accuracy_plot(
    results: Mapping[str, Mapping[str, float]],
    path: PathLike,
    *,
    title: str | None = None,
    ylabel: str = "linear probe accuracy",
) -> pathlib.Path:
    """One line per row (method / training source) of accuracy against layer, like the paper's Fig. 2.

    ``results`` maps a row name to ``{layer: accuracy}``; layers are ordered conv1 … conv5 when they are taps,
    otherwise in first-seen order. A row missing a layer has a gap there.
    """
    from matplotlib.figure import Figure

    from keras_oneimage.models.alexnet import AlexNet

    if not results or not all(isinstance(r, Mapping) and r for r in results.values()):
        raise InputError("layer_accuracy_plot needs a non-empty {row: {layer: accuracy}} mapping")
    seen: list[str] = []
    for row in results.values():
        seen += [layer for layer in row if layer not in seen]
    layers = sorted(seen, key=lambda n: (AlexNet.TAPS.index(n) if n in AlexNet.TAPS else len(AlexNet.TAPS),
                                         seen.index(n)))
    fig = Figure(figsize=(1.2 * len(layers) + 2.5, 3.5))
    ax = fig.add_subplot()
    xs = np.arange(len(layers))
    for name, row in results.items():
        ys = [float(row[layer]) if layer in row else np.nan for layer in layers]
        ax.plot(xs, ys, marker="o", label=str(name))
    ax.set_xticks(xs, layers)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


__all__ = ("conv1_filter_grid", "image_grid", "layer_accuracy_plot", "sobel_effective_filters")
