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
    first = tuple(getattr(backbone, "TAPS", ("conv1",)))[:1] or ("conv1",)  # AlexNet's conv1, ResNet-18's stem
    try:
        block = backbone.get_layer(first[0])
    except (ValueError, AttributeError):
        raise InputError("conv1_filter_grid needs a trunk (or a method model with .backbone)") from None
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


def filter_mosaic(kernel: np.ndarray, *, sobel: bool = False) -> np.ndarray:
    """Conv filters ``(k, k, C, N)`` as one ``(H, W, 1|3)`` mosaic, each filter scaled to [0, 1] on its own.

    RGB-input filters are shown in colour. ``sobel``: the filters see the 2-channel Sobel front end and are shown
    as the grayscale filters they apply to the image (:func:`sobel_effective_filters`).
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    cin = kernel.shape[2]
    if cin == 2 and sobel:
        tiles = sobel_effective_filters(kernel)[..., None]
    else:
        tiles = np.transpose(kernel, (3, 0, 1, 2))  # (N, k, k, C)
        if cin not in (1, 3):
            tiles = tiles.mean(axis=-1, keepdims=True)
    return _mosaic(_normalise_each(tiles), ncols=_filter_columns(kernel.shape[-1]))


def _filter_columns(n: int) -> int:
    """A landscape grid: 96 filters as 8 rows of 12."""
    return max(1, math.ceil(math.sqrt(n * 1.5)))


def conv1_filter_mosaic(model) -> np.ndarray:
    """The conv1 filters of ``model`` (an AlexNet, or a method with ``.backbone``) as one ``(H, W, C)`` mosaic.

    Each filter is normalised to [0, 1] on its own (as in the paper's Fig. 3). RGB-input filters are shown in
    colour; for a Sobel-input conv1 (DeepCluster) each filter is composed with the fixed Sobel front end and shown
    as the grayscale filter it applies to the image.
    """
    kernel, backbone = _conv1_kernel(model)
    return filter_mosaic(kernel, sobel=bool(getattr(backbone, "sobel", False)))


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


def conv1_filter_comparison(models: Mapping[str, Any], path: PathLike, *, ncols: int = 5) -> pathlib.Path:
    """Save the conv1 filter grids of several models, one titled panel each (paper Fig. 3): side by side, in rows
    of at most ``ncols`` panels, so that a whole table's trunks stay legible."""
    from matplotlib.figure import Figure

    if not models:
        raise ValueError("conv1_filter_comparison needs at least one model")
    cols = min(len(models), ncols)
    rows = -(-len(models) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    for i, (name, model) in enumerate(models.items()):
        _show(fig.add_subplot(rows, cols, i + 1), conv1_filter_mosaic(model), name)
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


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve is not ahead of the data."""
    cumsum = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def demo_figure(
    path: PathLike,
    *,
    source: np.ndarray,
    patches: np.ndarray,
    curve: Mapping[str, Any],
    steps_per_epoch: int,
    filters_before: np.ndarray,
    filters_after: np.ndarray,
    probe: Mapping[str, Mapping[str, float]],
    chance: float,
    probe_examples: np.ndarray | None = None,
    probe_classes: Any = (),
) -> pathlib.Path:
    """One picture of a run on one image (``make demo``): the image, its patches, the curve, filters, probes.

    Args:
        source: the source image, ``(H, W, 3)`` uint8 or float in [0, 1].
        patches: a batch of training patches ``(N, S, S, 3)`` in [0, 1].
        curve: per-step ``"loss"`` and ``"rotation_accuracy"`` (RotNet's 4-way task; chance is 0.25).
        steps_per_epoch: marks the epoch boundaries on the curve.
        filters_before, filters_after: conv1 kernels ``(k, k, 3, N)`` at the start and end of training; the
            24 filters that changed most are drawn, before, after and the change.
        probe: ``{"random" | "trained": {layer: accuracy}}``; drawn as bars side by side per layer.
        chance: the probe task's chance accuracy.
        probe_examples, probe_classes: one example image per class of the probe task, and the class names.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    loss = np.asarray(curve.get("loss", ()), dtype=np.float64)
    accuracy = np.asarray(curve.get("rotation_accuracy", ()), dtype=np.float64)
    if not len(loss) or len(accuracy) != len(loss):
        raise InputError("demo_figure needs per-step 'loss' and 'rotation_accuracy' of equal, non-zero length")
    if not probe or not all(probe.values()):
        raise InputError("demo_figure needs probe accuracies {name: {layer: accuracy}}")
    fig = Figure(figsize=(15, 16.5), layout="constrained")
    fig.suptitle("What a CNN learned from one image: RotNet (Asano et al., ICLR 2020)", fontsize=17,
                 fontweight="bold")
    rows = fig.add_gridspec(3, 2, height_ratios=(1.0, 0.95, 0.95), width_ratios=(1, 1.35))

    # Row 1: the image and the patches it became.
    ax = fig.add_subplot(rows[0, 0])
    src = np.asarray(source)
    ax.imshow(src if src.dtype == np.uint8 else np.clip(src, 0, 1))
    ax.set_axis_off()
    ax.set_title(f"1. The only training image ({src.shape[1]}x{src.shape[0]} px)", fontsize=13, loc="left")
    ax = fig.add_subplot(rows[0, 1])
    mosaic = _mosaic(np.clip(np.asarray(patches, dtype=np.float32), 0, 1), ncols=8, pad=2)
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    side = np.asarray(patches).shape[1]
    ax.set_title(f"2. A batch of the endless patch stream it became ({side}x{side} px): crops down to\n"
                 "1/10,000 of the image, stretched, rotated up to 35°, flipped, recoloured", fontsize=13, loc="left")

    # Row 2: the training curve, and the probes.
    ax = fig.add_subplot(rows[1, 0])
    steps = np.arange(1, len(loss) + 1)
    window = max(1, min(10, len(loss) // 5))
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=1)
    ax.plot(steps, _smooth(loss, window), color="tab:blue", linewidth=2.2, label="loss (left)")
    ax.set_xlabel("training step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("rotation loss (cross-entropy)", color="tab:blue")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(steps, accuracy, color="tab:orange", alpha=0.25, linewidth=1)
    right.plot(steps, _smooth(accuracy, window), color="tab:orange", linewidth=2.2,
               label="which way is up? accuracy (right)")
    right.axhline(0.25, color="tab:orange", linestyle="--", linewidth=1.2, label="chance: 0.25")
    right.set_ylim(0, 1)
    right.set_ylabel("rotation accuracy", color="tab:orange")
    for boundary in range(steps_per_epoch, len(loss), steps_per_epoch):
        ax.axvline(boundary + 0.5, color="0.8", linewidth=0.8, zorder=0)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    right.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=10, framealpha=0.9)
    ax.set_title(f"3. Training: guess each patch's rotation (0/90/180/270°); final accuracy "
                 f"{_smooth(accuracy, window)[-1]:.0%}", fontsize=13, loc="left")

    cell = rows[1, 1].subgridspec(2, 1, height_ratios=(0.22, 1)) if probe_examples is not None else None
    if cell is not None:
        strip = fig.add_subplot(cell[0])
        examples = np.clip(np.asarray(probe_examples, dtype=np.float32), 0, 1)
        strip.imshow(_mosaic(examples, ncols=len(examples), pad=2), interpolation="nearest")
        strip.set_axis_off()
        names = list(probe_classes)
        if names:
            tile = examples.shape[2] + 2
            for i, name in enumerate(names):
                strip.text(2 + i * tile + examples.shape[2] / 2, -1, name, ha="center", va="bottom", fontsize=10)
        strip.set_title(f"4. Linear probe: which shape is drawn? ({len(examples)} classes, on new patches of the "
                        "image)", fontsize=13, loc="left", pad=18)
        ax = fig.add_subplot(cell[1])
    else:
        ax = fig.add_subplot(rows[1, 1])
        ax.set_title("4. Linear probes", fontsize=13, loc="left")
    names = list(probe)
    layers = list(next(iter(probe.values())))
    xs = np.arange(len(layers))
    width = 0.8 / len(names)
    colours = {"random": "0.6", "trained": "tab:green"}
    for i, name in enumerate(names):
        values = [float(probe[name].get(layer, np.nan)) for layer in layers]
        label = {"random": "untrained trunk (its weights before training)",
                 "trained": "trained on the one image"}.get(name, name)
        bars = ax.bar(xs + (i - (len(names) - 1) / 2) * width, values, width * 0.92, label=label,
                      color=colours.get(name))
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.015, f"{value:.0%}", ha="center", va="bottom",
                    fontsize=15, fontweight="bold")
    ax.axhline(chance, color="black", linestyle="--", linewidth=1.2, label=f"chance: {chance:.0%}")
    ax.set_xticks(xs, [f"features of {layer}" for layer in layers], fontsize=12)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("test accuracy")
    ax.legend(loc="upper left", fontsize=10)

    # Row 3: conv1 before and after. After a short run most of each filter is still its random start, so the
    # filters that changed most are shown large, with the change itself (what training added) beside them.
    before, after = np.asarray(filters_before, np.float64), np.asarray(filters_after, np.float64)
    change = after - before
    k, n = before.shape[0], before.shape[-1]
    moved = np.linalg.norm(change.reshape(-1, n), axis=0) / np.maximum(np.linalg.norm(before.reshape(-1, n), axis=0),
                                                                        1e-12)
    shown = np.sort(np.argsort(-moved)[: min(n, 24)])
    panels = rows[2, :].subgridspec(1, 3)
    for col, (kernel, when) in enumerate(((before, "before training"), (after, "after training"),
                                          (change, "what training added (after - before)"))):
        ax = fig.add_subplot(panels[col])
        _show(ax, _mosaic(_normalise_each(np.transpose(kernel[..., shown], (3, 0, 1, 2))), ncols=6, pad=1), None)
        ax.set_title(f"{5 + col}. conv1, {when}", fontsize=13, loc="left")
    fig.text(0.5, 0.005, f"Row 3: the {len(shown)} of the {n} conv1 filters ({k}x{k} px, RGB) that changed most in "
             f"training, each scaled to its own range; the median filter moved {np.median(moved):.0%} of its size.",
             ha="center", va="bottom", fontsize=11)
    return _save(fig, path)


__all__ = ("conv1_filter_grid", "demo_figure", "filter_mosaic", "image_grid", "layer_accuracy_plot",
           "sobel_effective_filters")
