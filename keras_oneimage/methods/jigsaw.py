"""Jigsaw: cut a patch into a 3x3 grid of tiles, shuffle them, and predict which permutation was applied.

Noroozi & Favaro, "Unsupervised learning of visual representations by solving jigsaw puzzles", ECCV 2016. A
225 px patch is split into 75 px cells and a random 64 px tile is cut from each cell, so neighbouring tiles are
separated by a random gap (no edge continuity to match) and jittered. The tiles are shuffled by one of P
permutations, chosen greedily from all 9! to be far apart in Hamming distance (their §3.2 and Algorithm 1), and a
siamese network (the same trunk on every tile) classifies which one. Each tile is normalised by its own mean and
standard deviation and its colour channels are shifted against each other by a few pixels (their §3.2), so the
trunk cannot solve the puzzle from chromatic aberration or from low-level statistics shared by neighbours.

Here the trunk's output for each tile is average-pooled, the nine pooled vectors are concatenated in the order
the tiles appear (position 0 … 8, row-major), and an MLP head classifies the permutation. Asano et al. (ICLR 2020)
use RotNet, DeepCluster and BiGAN; Jigsaw is the fourth classic pretext task their question applies to.
"""
from __future__ import annotations

import functools
import itertools
import math
import random
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage.errors import InputError
from keras_oneimage.methods.base import SelfSupervisedMethod, unpack_patches
from keras_oneimage.methods.registry import register
from keras_oneimage.models.heads import check_head_widths, default_head_widths, mlp_head

GRID = 3
NUM_TILES = GRID * GRID
#: Noroozi & Favaro §3.2: 225 px patches, 75 px cells, 64 px tiles; the tile keeps this fraction of its cell.
PAPER_CELL, PAPER_TILE = 75, 64
#: Their ±2 px channel jitter on 64 px tiles; smaller tiles get proportionally less (at least 1 px).
PAPER_CHANNEL_JITTER = 2
DEFAULT_PERMUTATIONS = 100
#: Noroozi & Favaro train with 100 to 1000 permutations (their Table 3); more make the greedy choice slow.
MAX_PERMUTATIONS = 1000
#: Smallest tile side per AlexNet variant: the smallest input `fit` accepts for the variant (for "imagenet" the
#: smallest side whose pool5 map is not empty, ``AlexNet.feature_shapes``; for "cifar" a conv5 map of 4x4).
MIN_TILE_SIZE = {"cifar": 16, "imagenet": 63}
#: Floor of a tile's standard deviation in per-tile normalisation, about 2.5 grey levels: near-flat tiles (the
#: smallest crops of the augmentation) keep a small contrast instead of having their rendering noise blown up to
#: unit variance.
TILE_STD_FLOOR = 0.01

__all__ = [
    "MAX_PERMUTATIONS", "MIN_TILE_SIZE", "Jigsaw", "cut_tiles", "hamming_permutations", "make_puzzles",
    "min_pairwise_distance", "normalize_tiles", "permutation_loss", "shuffle_tiles", "smallest_image_size",
    "tile_size",
]


# ---------------------------------------------------------------------------------------------------- geometry
def tile_size(image_size: int) -> int:
    """Side of the tiles cut from an ``image_size`` px patch: ``64/75`` of its cell, as 64 px tiles in 75 px cells.

    >>> tile_size(225), tile_size(114), tile_size(64)
    (64, 32, 17)
    """
    return (int(image_size) // GRID) * PAPER_TILE // PAPER_CELL


def smallest_image_size(min_tile: int) -> int:
    """The smallest patch side whose tiles (`tile_size`) are at least ``min_tile`` px."""
    cell = -(-int(min_tile) * PAPER_CELL // PAPER_TILE)  # ceil
    return GRID * cell


def default_channel_jitter(tile: int) -> int:
    """Channel jitter in px for ``tile`` px tiles: Noroozi & Favaro's ±2 px at 64 px, scaled, at least 1."""
    return max(1, round(PAPER_CHANNEL_JITTER * tile / PAPER_TILE))


def _too_small(image_size: int, variant: str) -> InputError:
    smallest = smallest_image_size(MIN_TILE_SIZE[variant])
    return InputError(
        f"jigsaw cuts an image_size {image_size} patch into 3x3 tiles of {tile_size(image_size)} px, too small for "
        f"the {variant} AlexNet (tiles of at least {MIN_TILE_SIZE[variant]} px): use image_size >= {smallest}"
    )


# ------------------------------------------------------------------------------------------------ permutations
@functools.lru_cache(maxsize=1)
def _all_permutations() -> np.ndarray:
    """All 9! permutations of the tiles, ``(362880, 9)`` int8, in lexicographic order."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(NUM_TILES)))
    return np.fromiter(flat, dtype=np.int8, count=math.factorial(NUM_TILES) * NUM_TILES).reshape(-1, NUM_TILES)


@functools.lru_cache(maxsize=8)
def _greedy_permutations(count: int, seed: int) -> np.ndarray:
    everything = _all_permutations()
    # has_value[i, v]: which permutations put tile v at position i (uint8), so that the number of positions where
    # every permutation agrees with p is nine vector additions instead of a (9!, 9) comparison.
    by_position = np.ascontiguousarray(everything.T)  # (9, 9!): C-contiguous rows, or every sum below is strided
    has_value = (by_position[:, None, :] == np.arange(NUM_TILES, dtype=np.int8)[None, :, None]).view(np.uint8)

    def distances_to(p: np.ndarray) -> np.ndarray:
        agree = has_value[0, p[0]].copy()
        for i in range(1, NUM_TILES):
            agree += has_value[i, p[i]]
        return NUM_TILES - agree

    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(len(everything)))]
    min_distance = distances_to(everything[chosen[0]])
    sum_distance = min_distance.astype(np.int32)
    # Each step takes a permutation whose minimum distance to the chosen ones is largest; among those, one with
    # the largest total distance (Noroozi & Favaro's Algorithm 1 criterion); among those, a seeded random one.
    # The chosen ones are at distance 0 from themselves, so none is chosen twice. ``candidates`` holds the
    # permutations at the current best minimum distance; it only shrinks until it empties and the level drops.
    candidates, level = np.empty(0, np.int64), 0
    for _ in range(count - 1):
        if candidates.size == 0:
            level = min_distance.max()
            candidates = np.flatnonzero(min_distance == level)
        totals = sum_distance[candidates]
        best = candidates[totals == totals.max()]
        j = int(best[rng.integers(len(best))])
        chosen.append(j)
        d = distances_to(everything[j])
        np.minimum(min_distance, d, out=min_distance)
        sum_distance += d
        candidates = candidates[min_distance[candidates] == level]
    out = everything[chosen].astype(np.int32)
    out.setflags(write=False)
    return out


def hamming_permutations(count: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> np.ndarray:
    """``count`` permutations of the 9 tiles, chosen greedily to be far apart: ``(count, 9)`` int32.

    Noroozi & Favaro (ECCV 2016, §3.2, Algorithm 1) pick the permutation set from all 9! greedily, each new one
    as far as possible from those already chosen: a set whose members are far apart in Hamming distance makes the
    task harder and the features better (their Table 3). Here each step takes a permutation whose *minimum*
    distance to the chosen ones is largest (so the set's minimum distance is as large as the greedy order allows),
    breaking ties by the largest total distance (their criterion), then at random. The first permutation and the
    random tie-breaks follow ``seed``, so a seed fixes the set. Row ``k`` maps position ``i`` to tile
    ``row[i]``: see `shuffle_tiles`.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 2 <= count <= MAX_PERMUTATIONS:
        raise InputError(f"num_permutations must be an integer from 2 to {MAX_PERMUTATIONS}, got {count!r}")
    return _greedy_permutations(int(count), int(seed))


def min_pairwise_distance(permutations: np.ndarray) -> int:
    """The smallest Hamming distance between two rows of ``permutations``."""
    p = np.asarray(permutations)
    d = np.count_nonzero(p[:, None, :] != p[None, :, :], axis=-1)
    np.fill_diagonal(d, NUM_TILES + 1)
    return int(d.min())


def check_permutations(permutations, count: int) -> np.ndarray:
    """``permutations`` as a ``(count, 9)`` int32 array of distinct permutations of 0..8, or InputError."""
    try:
        array = np.asarray(permutations, dtype=np.int64)
    except (TypeError, ValueError):
        raise InputError("permutations must be a list of permutations of 0..8") from None
    if array.shape != (count, NUM_TILES):
        raise InputError(f"permutations must have shape ({count}, {NUM_TILES}), got {array.shape}")
    if not (np.sort(array, axis=1) == np.arange(NUM_TILES)).all():
        raise InputError("every row of permutations must be a permutation of 0..8")
    if len(np.unique(array, axis=0)) != count:
        raise InputError("permutations must be distinct")
    return array.astype(np.int32)


# ------------------------------------------------------------------------------------------------------- tiles
def cut_tiles(patches: tf.Tensor, tile: int, seed=None, channel_jitter: int = 0) -> tf.Tensor:
    """``(B, S, S, C)`` patches → ``(B, 9, T, T, C)`` tiles, in row-major cell order (tile ``k`` from cell ``k``).

    The patch is divided into a 3x3 grid of ``S // 3`` px cells (centred when ``S`` is not a multiple of 3) and
    a ``T`` px tile is cut from each cell at a random position (``seed``: a stateless philox seed; ``None`` cuts
    every tile from the centre of its cell, with no jitter). Each colour channel is then shifted by up to
    ``±channel_jitter`` px on each axis, independently, staying inside the cell: no tile holds pixels of a
    neighbouring cell, so tiles never share an edge.
    """
    size, channels = patches.shape[1], patches.shape[3]
    if size is None or channels is None or patches.shape[2] != size:
        raise InputError(f"jigsaw needs square patches of a known size, got shape {tuple(patches.shape)}")
    cell = size // GRID
    room = cell - int(tile)
    if room < 0 or tile < 1:
        raise InputError(f"tiles of {tile} px do not fit in the {cell} px cells of a {size} px patch")
    batch = tf.shape(patches)[0]
    if seed is None:
        start = tf.fill([batch, NUM_TILES, channels, 2], room // 2)
    else:
        offset_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
        offset = tf.random.stateless_uniform([batch, NUM_TILES, 1, 2], offset_seed, minval=0, maxval=room + 1,
                                             dtype=tf.int32, alg="philox")
        jitter = tf.random.stateless_uniform([batch, NUM_TILES, channels, 2], jitter_seed, minval=-channel_jitter,
                                             maxval=channel_jitter + 1, dtype=tf.int32, alg="philox")
        start = tf.clip_by_value(offset + jitter, 0, room)
    margin = (size - GRID * cell) // 2
    origin = np.array([(r * cell + margin, c * cell + margin) for r in range(GRID) for c in range(GRID)], np.int32)
    start = start + origin[None, :, None, :]  # (B, 9, C, 2): each channel's top-left corner in the patch
    steps = tf.range(tile, dtype=tf.int32)
    rows = tf.transpose(start[..., 0:1] + steps, [0, 1, 3, 2])[:, :, :, None, :]  # (B, 9, T, 1, C)
    cols = tf.transpose(start[..., 1:2] + steps, [0, 1, 3, 2])[:, :, None, :, :]  # (B, 9, 1, T, C)
    image = tf.range(batch, dtype=tf.int32)[:, None, None, None, None]
    flat = ((image * size + rows) * size + cols) * channels + tf.range(channels, dtype=tf.int32)
    return tf.gather(tf.reshape(patches, [-1]), flat)


def normalize_tiles(tiles: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """Each tile's channels standardised by their own mean and std, then mapped into the trunk's input convention.

    Noroozi & Favaro normalise every tile independently (§3.2), so that the trunk cannot match tiles by mean
    brightness or contrast. The trunk normalises its input by the fixed ``mean``/``std`` inside
    (``AlexNet.preprocess``); the result here is ``z * std + mean``, so what conv1 sees is exactly the per-tile
    standardised ``z`` (no longer in [0, 1], which the trunk does not require).
    """
    tile_mean, tile_var = tf.nn.moments(tiles, axes=[-3, -2], keepdims=True)
    z = (tiles - tile_mean) / tf.maximum(tf.sqrt(tile_var), TILE_STD_FLOOR)
    return z * tf.constant(std, tiles.dtype) + tf.constant(mean, tiles.dtype)


def shuffle_tiles(tiles: tf.Tensor, labels: tf.Tensor, permutations) -> tf.Tensor:
    """Position ``i`` of puzzle ``b`` gets tile ``permutations[labels[b], i]`` of ``tiles[b]``.

    Unshuffling is the inverse gather: ``tiles[b, permutations[labels[b], i]] == shuffled[b, i]``.
    """
    order = tf.gather(tf.constant(permutations, tf.int32), labels)  # (B, 9)
    return tf.gather(tiles, order, axis=1, batch_dims=1)


def make_puzzles(patches: tf.Tensor, permutations, seed, *, channel_jitter: int | None = None,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """Puzzles from a patch batch: ``(shuffled tiles (B, 9, T, T, C), labels (B,) int32)``.

    Tiles are cut with gap and jitter (`cut_tiles`, ``T = tile_size(S)``), normalised per tile (`normalize_tiles`,
    skipped when ``mean`` is None), and shuffled (`shuffle_tiles`) by a permutation drawn uniformly for each patch.
    ``channel_jitter=None`` uses `default_channel_jitter`.
    """
    size = patches.shape[1]
    if size is None:
        raise InputError("jigsaw needs patches of a known size")
    tile = tile_size(size)
    jitter = default_channel_jitter(tile) if channel_jitter is None else int(channel_jitter)
    cut_seed, label_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2, alg="philox"))
    tiles = cut_tiles(patches, tile, cut_seed, jitter)
    if mean is not None:
        tiles = normalize_tiles(tiles, mean, std)
    labels = tf.random.stateless_uniform([tf.shape(patches)[0]], label_seed, minval=0,
                                         maxval=len(permutations), dtype=tf.int32, alg="philox")
    return shuffle_tiles(tiles, labels, permutations), labels


def permutation_loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Mean softmax cross-entropy over this replica's puzzles (not yet scaled for distribution)."""
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


# ------------------------------------------------------------------------------------------------------- model
@register("jigsaw")
@keras.saving.register_keras_serializable(package="keras_oneimage")
class Jigsaw(SelfSupervisedMethod):
    """Jigsaw puzzles (Noroozi & Favaro 2016) on a siamese AlexNet ``backbone``.

    Args:
        backbone: the trunk (an `AlexNet`), built for tiles: ``Jigsaw.trunk_input_size(image_size)`` px, which
            is what `fit` and `tune` build it for.
        num_permutations: P, the number of puzzle classes (2 to 1000; the paper's default 100, its Table 3).
        permutation_seed: fixes the permutation set (`hamming_permutations`).
        permutations: the set itself, ``(P, 9)``; given when a saved model is loaded, so the classes keep their
            meaning whatever the generator does.
        channel_jitter: how far (px) each colour channel of a tile is shifted, independently; ``None``: ±2 px at
            64 px tiles as in the paper, scaled with the tile (at least 1).
        head_widths: hidden widths of the MLP on the concatenated tile features (flatten → [Dense → BN → ReLU] per
            width → Dense P). Default ``(4096, 4096)`` for the "imagenet" AlexNet, ``(1024, 1024)`` for "cifar".
        seed: seeds the per-step tile positions, jitter and permutation draws (with the optimizer's step count,
            so a resumed run continues the same puzzles); ``None`` draws one from Python's ``random`` (seeded by
            `fit`).
    """

    def __init__(
        self,
        backbone: keras.Model,
        num_permutations: int = DEFAULT_PERMUTATIONS,
        permutation_seed: int = 0,
        permutations: Sequence[Sequence[int]] | None = None,
        channel_jitter: int | None = None,
        head_widths: Sequence[int] | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", "jigsaw")
        super().__init__(backbone, **kwargs)
        variant = getattr(backbone, "variant", "cifar")
        tile = getattr(backbone, "image_size", None)
        if variant in MIN_TILE_SIZE and tile is not None and int(tile) < MIN_TILE_SIZE[variant]:
            raise InputError(
                f"the trunk is built for {tile} px inputs; jigsaw trains the {variant} AlexNet on tiles of at least "
                f"{MIN_TILE_SIZE[variant]} px: build it for Jigsaw.trunk_input_size(image_size) with image_size >= "
                f"{smallest_image_size(MIN_TILE_SIZE[variant])}"
            )
        for name, value in (("permutation_seed", permutation_seed), ("seed", seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if channel_jitter is not None and (isinstance(channel_jitter, bool) or
                                           not isinstance(channel_jitter, (int, np.integer)) or channel_jitter < 0):
            raise InputError(f"channel_jitter must be an integer >= 0 or None, got {channel_jitter!r}")
        if permutations is None:
            permutations = hamming_permutations(num_permutations, int(permutation_seed))
        elif isinstance(num_permutations, bool) or not isinstance(num_permutations, (int, np.integer)) \
                or not 2 <= num_permutations <= MAX_PERMUTATIONS:
            raise InputError(f"num_permutations must be an integer from 2 to {MAX_PERMUTATIONS}, "
                             f"got {num_permutations!r}")
        self.permutations = check_permutations(permutations, int(num_permutations))
        self.num_permutations = int(num_permutations)
        self.permutation_seed = int(permutation_seed)
        self.channel_jitter = None if channel_jitter is None else int(channel_jitter)
        self.seed = int(seed) if seed is not None else random.randint(0, 2**31 - 1)
        self.head_widths = check_head_widths(default_head_widths(backbone) if head_widths is None else head_widths)
        self.head = mlp_head(self.head_widths, self.num_permutations, dtype=self.dtype_policy)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="permutation_accuracy")

    @classmethod
    def trunk_input_size(cls, image_size: int) -> int:
        """The tile side for ``image_size`` px patches (`tile_size`); InputError when no AlexNet takes it."""
        if tile_size(image_size) < min(MIN_TILE_SIZE.values()):
            raise _too_small(image_size, min(MIN_TILE_SIZE, key=MIN_TILE_SIZE.get))
        return tile_size(image_size)

    # ------------------------------------------------------------------------------------------------ model
    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def _trunk_mean_std(self):
        if getattr(self.backbone, "sobel", False):
            return None, None  # the Sobel front end discards colour: per-tile colour statistics do not apply
        return getattr(self.backbone, "mean", (0.0, 0.0, 0.0)), getattr(self.backbone, "std", (1.0, 1.0, 1.0))

    def tile_features(self, tiles, training=None):
        """``(B, 9, T, T, 3)`` tiles → ``(B, 9·C)``: each tile through the trunk, average-pooled, concatenated."""
        if tiles.shape.rank != 5 or tiles.shape[1] != NUM_TILES or None in tiles.shape[2:]:
            raise InputError(f"expected tiles of shape (B, 9, T, T, C) with known T and C, got {tuple(tiles.shape)}")
        flat = tf.reshape(tiles, [-1, *tiles.shape[2:]])
        pooled = tf.reduce_mean(self.backbone(flat, training=training), axis=[1, 2])
        return tf.reshape(pooled, [-1, NUM_TILES * pooled.shape[-1]])

    def call(self, x, training=None):
        """Permutation logits ``(B, P)`` (float32).

        ``x`` is either prepared puzzles ``(B, 9, T, T, 3)`` (as `make_puzzles` returns) or patches
        ``(B, S, S, 3)``, whose tiles are then cut from the centre of each cell, normalised and kept in place: the
        logits say which permutation the patch's own arrangement looks like.
        """
        if x.shape.rank == 4:
            size = x.shape[1]
            if size is None:
                raise InputError("jigsaw needs patches of a known size")
            tiles = cut_tiles(tf.cast(x, tf.float32), tile_size(size))
            mean, std = self._trunk_mean_std()
            x = normalize_tiles(tiles, mean, std) if mean is not None else tiles
        return self.head(self.tile_features(x, training=training), training=training)

    def build(self, input_shape=None):
        size = int(getattr(self.backbone, "image_size", 0) or 0)
        if not self.backbone.built:
            self.backbone.build((None, size, size, 3))
        channels = self.backbone.feature_shapes(size)["output"][-1]
        self.head.build((None, NUM_TILES * channels))
        self.built = True

    def default_optimizer(self) -> keras.optimizers.Optimizer:
        """SGD with momentum 0.9 and weight decay 5e-4 (Noroozi & Favaro §4 train with SGD from lr 0.01 without
        BatchNorm; with BatchNorm this trunk takes the 0.05 the other methods use)."""
        return keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, weight_decay=5e-4)

    # ------------------------------------------------------------------------------------------------ training
    def _step_seed(self, stream: int) -> tf.Tensor:
        seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, stream], tf.int64),
                                                        self.optimizer.iterations, alg="philox")
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica is not None else 0
        return tf.random.experimental.stateless_fold_in(seed, replica_id, alg="philox")

    def puzzles(self, patches, seed) -> tuple[tf.Tensor, tf.Tensor]:
        """`make_puzzles` with this model's permutations, jitter and trunk normalisation."""
        patches = tf.cast(patches, tf.float32)
        size = patches.shape[1]
        variant = getattr(self.backbone, "variant", "cifar")
        if size is not None and variant in MIN_TILE_SIZE and tile_size(size) < MIN_TILE_SIZE[variant]:
            raise _too_small(size, variant)
        mean, std = self._trunk_mean_std()
        return make_puzzles(patches, self.permutations, seed, channel_jitter=self.channel_jitter, mean=mean, std=std)

    def _step(self, data, training: bool):
        # Training and evaluation draw from separate streams, so evaluating does not replay training's puzzles.
        inputs, labels = self.puzzles(unpack_patches(data), self._step_seed(0 if training else 1))
        if training:
            with tf.GradientTape() as tape:
                logits = self(inputs, training=True)
                loss = permutation_loss(labels, logits)
                scaled = self.scaled_loss(loss)
            self.minimize(scaled, tape)
        else:
            logits = self(inputs, training=False)
            loss = permutation_loss(labels, logits)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        return self._step(data, training=True)

    def test_step(self, data):
        return self._step(data, training=False)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_permutations": self.num_permutations,
            "permutation_seed": self.permutation_seed,
            "permutations": self.permutations.tolist(),
            "channel_jitter": self.channel_jitter,
            "head_widths": list(self.head_widths),
            "seed": self.seed,
        }

