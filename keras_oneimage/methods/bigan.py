"""BiGAN: learn an encoder E by fooling a discriminator that sees (image, code) pairs.

Donahue, Krähenbühl & Darrell, "Adversarial feature learning", ICLR 2017. A generator G maps a code z ~ U(-1, 1)^d
to an image, the encoder E maps an image x to a code, and a discriminator D(x, z) tells real pairs (x, E(x)) from
fake pairs (G(z), z). At the optimum E inverts G, so E (here: the AlexNet trunk + a linear head) must capture what
G needs to draw the patch. Asano et al. (ICLR 2020, §4) train it on patches of a single image.

Stabilisers (see docs/methods.md for why):

* non-saturating objective (Goodfellow et al. 2014, §3): E and G minimise the BCE of the *swapped* labels instead
  of maximising D's loss, so their gradients do not vanish when D wins early;
* Adam with β1 = 0.5 (Donahue et al. §4, after DCGAN) and two time-scales (Heusel et al. 2017): separate rates
  for the two players. In our single-image runs D wins at Donahue et al.'s equal 2e-4 (D accuracy 0.87-1.00 for
  all of a full-width 80-step run, and 0.99-1.00 from the second epoch on in the test-size model), so E and G take the faster
  rate: ``eg_learning_rate`` 5e-4, ``d_learning_rate`` 5e-5. With those D accuracy leaves 0.5 and comes back as
  G and E catch up (docs/methods.md, experiments/RESULTS.md);
* spectral normalisation of every D layer (Miyato et al. 2018, ``keras.layers.SpectralNormalization``) and dropout
  0.2 in D's joint part (as BiGAN's own discriminator), no BatchNorm in D.

Logged: ``d_loss``, ``eg_loss``, ``d_accuracy`` (over real and fake pairs), ``d_acc_real``, ``d_acc_fake``.
`method_callbacks` adds :class:`BiGANSamples`, which writes ``bigan_samples_epoch{E}.png`` (1-based E) to the run's
output_dir. A NaN/inf loss is caught by `run_training`'s guard, which stops and names the epoch and step.
"""
from __future__ import annotations

import math
import os
import pathlib
import random

import keras
import numpy as np
import tensorflow as tf

from keras_oneimage import validation
from keras_oneimage.errors import InputError
from keras_oneimage.methods.base import FitContext, SelfSupervisedMethod, unpack_patches
from keras_oneimage.methods.registry import register

#: Latent size (Donahue et al. 2017, §4.2 ImageNet experiments: z ∈ [-1, 1]^200).
DEFAULT_LATENT_DIM = 200
#: Dropout in D's latent and joint branches (BiGAN's discriminator uses dropout 0.2).
DEFAULT_DROPOUT = 0.2
#: Adam β1 = 0.5 (Donahue et al. 2017 §4, following DCGAN, Radford et al. 2016).
ADAM_BETA_1 = 0.5
#: Donahue et al. 2017 (§4) use 2e-4 for both players; here the two time-scales (Heusel et al. 2017) are set so that
#: D does not win the single-image game outright (see the module docstring): E and G 10x faster than D.
D_LEARNING_RATE = 5e-5
EG_LEARNING_RATE = 5e-4
#: The encoder's own Adam rate: D's, a tenth of G's. Chosen on val (experiments/RESULTS.md, "BiGAN's time-scales"):
#: on Image A, two seeds, it lifted conv2 by 5.3 and conv3 by 7.9 points over E sharing G's optimizer.
E_LEARNING_RATE = 5e-5
LEAKY_SLOPE = 0.2


def bigan_losses(real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(d_loss, eg_loss) from D's logits on real pairs (x, E(x)) and fake pairs (G(z), z).

    ``d_loss`` is the BCE of real→1, fake→0; ``eg_loss`` is the non-saturating BCE of the swapped labels,
    real→0, fake→1. Both are means over the batch, summed over the two kinds of pairs.
    """
    bce = tf.nn.sigmoid_cross_entropy_with_logits
    real_logits = tf.cast(real_logits, tf.float32)
    fake_logits = tf.cast(fake_logits, tf.float32)
    ones, zeros = tf.ones_like(real_logits), tf.zeros_like(fake_logits)
    d_loss = tf.reduce_mean(bce(ones, real_logits)) + tf.reduce_mean(bce(zeros, fake_logits))
    eg_loss = tf.reduce_mean(bce(zeros, real_logits)) + tf.reduce_mean(bce(tf.ones_like(fake_logits), fake_logits))
    return d_loss, eg_loss


def _upsampling_plan(image_size: int) -> tuple[int, int]:
    """(stride-2 stages, start side) so that ``start · 2**stages >= image_size`` with a 4..7 px start (DCGAN)."""
    stages = max(1, int(math.floor(math.log2(image_size / 4))))
    return stages, math.ceil(image_size / 2**stages)


def build_generator(latent_dim: int, image_size: int, width: int = 64) -> keras.Sequential:
    """DCGAN generator (Radford et al. 2016): z → Dense → [Conv2DTranspose 4x4/2 + BN + ReLU]… → sigmoid image.

    Channels halve at each stage down to ``width``; the output is ``(image_size, image_size, 3)`` in [0, 1]
    (centre-cropped when the size is not ``start · 2**stages``).
    """
    stages, start = _upsampling_plan(image_size)
    top = width * 2 ** (stages - 1)
    layers: list[keras.layers.Layer] = [
        keras.layers.Dense(start * start * top, use_bias=False, name="project"),
        keras.layers.BatchNormalization(momentum=0.9, name="project_bn"),
        keras.layers.ReLU(name="project_relu"),
        keras.layers.Reshape((start, start, top), name="reshape"),
    ]
    for i in range(stages - 1):
        layers += [
            keras.layers.Conv2DTranspose(top // 2 ** (i + 1), 4, strides=2, padding="same", use_bias=False,
                                         name=f"up{i + 1}"),
            keras.layers.BatchNormalization(momentum=0.9, name=f"up{i + 1}_bn"),
            keras.layers.ReLU(name=f"up{i + 1}_relu"),
        ]
    layers.append(keras.layers.Conv2DTranspose(3, 4, strides=2, padding="same", name=f"up{stages}"))
    excess = start * 2**stages - image_size
    if excess:
        layers.append(keras.layers.Cropping2D(((excess // 2, excess - excess // 2),) * 2, name="crop"))
    layers.append(keras.layers.Activation("sigmoid", dtype="float32", name="to_unit"))
    generator = keras.Sequential(layers, name="generator")
    generator.build((None, latent_dim))
    return generator


def build_discriminator(latent_dim: int, image_size: int, width: int = 64, dropout: float = DEFAULT_DROPOUT,
                        spectral_norm: bool = True) -> keras.Model:
    """Joint D(x, z) (Donahue et al. 2017, §3): conv image branch, dense latent branch, concat → dense → logit.

    Every conv/dense layer is spectrally normalised when ``spectral_norm``; LeakyReLU(0.2) throughout.
    """

    def sn(layer):
        return keras.layers.SpectralNormalization(layer, name=f"{layer.name}_sn") if spectral_norm else layer

    stages, _ = _upsampling_plan(image_size)
    x_in = keras.Input((image_size, image_size, 3), name="x")
    z_in = keras.Input((latent_dim,), name="z")
    h = keras.layers.Rescaling(2.0, offset=-1.0, name="to_signed")(x_in)  # [0, 1] → [-1, 1]
    for i in range(stages):
        # No conv bias: TF's grappler fuses Conv2D+BiasAdd+LeakyRelu and then fails on the gradient graph
        # ("remapper failed" on every run); without BiasAdd there is nothing to fuse.
        conv = keras.layers.Conv2D(width * 2**i, 4, strides=2, padding="same", use_bias=False, name=f"conv{i + 1}")
        h = sn(conv)(h)
        h = keras.layers.LeakyReLU(LEAKY_SLOPE, name=f"conv{i + 1}_lrelu")(h)
    h = keras.layers.Flatten(name="x_flat")(h)
    g = sn(keras.layers.Dense(512, name="z_fc"))(z_in)
    g = keras.layers.LeakyReLU(LEAKY_SLOPE, name="z_lrelu")(g)
    j = keras.layers.Concatenate(name="joint")([h, g])
    j = keras.layers.Dropout(dropout, name="joint_dropout1")(j)
    j = sn(keras.layers.Dense(1024, name="joint_fc"))(j)
    j = keras.layers.LeakyReLU(LEAKY_SLOPE, name="joint_lrelu")(j)
    j = keras.layers.Dropout(dropout, name="joint_dropout2")(j)
    logit = sn(keras.layers.Dense(1, dtype="float32", name="logit"))(j)
    return keras.Model([x_in, z_in], logit, name="discriminator")


@register("bigan")
@keras.saving.register_keras_serializable(package="keras_oneimage")
class BiGAN(SelfSupervisedMethod):
    """BiGAN with an AlexNet encoder.

    Args:
        backbone: the trunk; E(x) = Dense(latent_dim)(flatten(backbone(x))).
        latent_dim: size of z (200, Donahue et al. 2017).
        generator_width, discriminator_width: DCGAN base widths (64, Radford et al. 2016).
        dropout: dropout in D's joint part (0.2).
        spectral_norm: spectrally normalise D (Miyato et al. 2018).
        d_learning_rate, eg_learning_rate: Adam learning rates of `default_optimizer` (5e-5 for D, 5e-4 for E and
            G; Donahue et al. use 2e-4 for both, at which D wins the single-image runs outright).
        e_learning_rate: the encoder's own Adam rate, apart from G's (default 5e-5, D's rate and a tenth of G's);
            None: E shares G's optimizer and ``eg_learning_rate``, as in Donahue et al. (this package's default
            until 2026-12-03). E learns only through D's code branch, so when D judges pairs by their image, E's
            gradient says little and an adaptive optimizer still takes full steps on it (`bigan_diagnostics`): a
            slower E than G keeps the trunk nearer what it learned.
        seed: seeds the z draws; default: drawn from Python's RNG (fixed by ``keras.utils.set_random_seed``).
    """

    def __init__(
        self,
        backbone: keras.Model,
        latent_dim: int = DEFAULT_LATENT_DIM,
        generator_width: int = 64,
        discriminator_width: int = 64,
        dropout: float = DEFAULT_DROPOUT,
        spectral_norm: bool = True,
        d_learning_rate: float = D_LEARNING_RATE,
        eg_learning_rate: float = EG_LEARNING_RATE,
        e_learning_rate: float | None = E_LEARNING_RATE,
        seed: int | None = None,
        **kwargs,
    ):
        kwargs.setdefault("name", "bigan")
        super().__init__(backbone, **kwargs)
        for name, value in (("latent_dim", latent_dim), ("generator_width", generator_width),
                            ("discriminator_width", discriminator_width)):
            validation.positive_int(name, value)
        if not 0.0 <= float(dropout) < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
        rates = [("d_learning_rate", d_learning_rate), ("eg_learning_rate", eg_learning_rate)]
        if e_learning_rate is not None:
            rates.append(("e_learning_rate", e_learning_rate))
        for name, value in rates:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"{name} must be a positive number, got {value!r}")
        self.d_learning_rate = float(d_learning_rate)
        self.eg_learning_rate = float(eg_learning_rate)
        self.e_learning_rate = None if e_learning_rate is None else float(e_learning_rate)
        self.latent_dim = int(latent_dim)
        self.generator_width = int(generator_width)
        self.discriminator_width = int(discriminator_width)
        self.dropout = float(dropout)
        self.spectral_norm = bool(spectral_norm)
        self.seed = int(seed) if seed is not None else random.randint(0, 2**31 - 1)
        size = int(getattr(backbone, "image_size", 64))
        self.image_size = size
        self.encoder_head = keras.Sequential(
            [keras.layers.Flatten(name="flatten"), keras.layers.Dense(self.latent_dim, dtype="float32", name="z")],
            name="encoder_head",
        )
        self.generator = build_generator(self.latent_dim, size, self.generator_width)
        self.discriminator = build_discriminator(self.latent_dim, size, self.discriminator_width, self.dropout,
                                                 self.spectral_norm)
        self.d_optimizer: keras.optimizers.Optimizer | None = None
        self.e_optimizer: keras.optimizers.Optimizer | None = None  # set only when E has its own rate
        self.trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("d_loss", "eg_loss", "d_accuracy", "d_acc_real", "d_acc_fake")
        }

    # ------------------------------------------------------------------------------------------------ model
    @property
    def metrics(self):
        return list(self.trackers.values())

    def encode(self, x, training=None):
        """E(x): the latent code ``(B, latent_dim)`` of patches in [0, 1]."""
        return self.encoder_head(self.backbone(x, training=training), training=training)

    def call(self, x, training=None):
        """E(x) (what BiGAN learns to represent a patch by)."""
        return self.encode(x, training=training)

    def build(self, input_shape=None):
        if input_shape is None:
            input_shape = (None, self.image_size, self.image_size, 3)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        self.encoder_head.build((None, *self.backbone.feature_shapes(input_shape[1])["output"]))
        # generator and discriminator were built when constructed (fixed input shapes)
        self.built = True
        self._build_optimizers()

    def encoder_variables(self) -> list:
        """Trainable variables of the encoder: the trunk and its head to z."""
        return [*self.backbone.trainable_variables, *self.encoder_head.trainable_variables]

    def eg_variables(self) -> list:
        """Trainable variables of the encoder (trunk + head) and the generator."""
        return [*self.encoder_variables(), *self.generator.trainable_variables]

    def _player_variables(self) -> dict[str, list]:
        """``{optimizer key: the variables it updates}``: E goes with G unless it has its own optimizer."""
        if self.e_optimizer is None:
            return {"d": self.discriminator.trainable_variables, "eg": self.eg_variables()}
        return {"d": self.discriminator.trainable_variables, "eg": self.generator.trainable_variables,
                "e": self.encoder_variables()}

    # ------------------------------------------------------------------------------------------------ optimizers
    def default_optimizer(self) -> dict[str, keras.optimizers.Optimizer]:
        """``{"d": Adam, "eg": Adam}`` with β1 = 0.5 and the ``d_/eg_learning_rate`` options (Donahue et al. §4),
        plus ``"e"`` at ``e_learning_rate`` for the encoder when that option is set (then "eg" steps G only)."""
        rates = {"d": self.d_learning_rate, "eg": self.eg_learning_rate}
        if self.e_learning_rate is not None:
            rates["e"] = self.e_learning_rate
        return {key: keras.optimizers.Adam(rate, beta_1=ADAM_BETA_1, beta_2=0.999) for key, rate in rates.items()}

    def compile(self, optimizer=None, **kwargs):
        """``optimizer``: ``{"d": …, "eg": …}`` (and ``"e": …`` to give the encoder its own), one optimizer (cloned
        for D), or None for `default_optimizer`."""
        if optimizer is None:
            optimizer = self.default_optimizer()
        if isinstance(optimizer, dict):
            unknown = set(optimizer) - {"d", "eg", "e"}
            if unknown or not {"d", "eg"} <= set(optimizer):
                raise InputError("BiGAN optimizers must be a dict with keys 'd' and 'eg' (and optionally 'e'), "
                                 f"got {sorted(optimizer)}")
            d_opt, eg_opt, e_opt = optimizer["d"], optimizer["eg"], optimizer.get("e")
        else:
            eg_opt = keras.optimizers.get(optimizer)
            d_opt = eg_opt.__class__.from_config(eg_opt.get_config())
            e_opt = None
        super().compile(optimizer=eg_opt, **kwargs)
        self.d_optimizer = d_opt
        self.e_optimizer = e_opt
        self._build_optimizers()

    def _optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        found = {"d": getattr(self, "d_optimizer", None), "eg": getattr(self, "optimizer", None),
                 "e": getattr(self, "e_optimizer", None)}
        return {key: opt for key, opt in found.items() if opt is not None}

    def get_compile_config(self) -> dict | None:
        optimizers = self._optimizers()
        if not {"d", "eg"} <= set(optimizers):
            return None
        return {key: keras.saving.serialize_keras_object(opt) for key, opt in optimizers.items()}

    def compile_from_config(self, config: dict) -> None:
        self.compile({key: keras.saving.deserialize_keras_object(value) for key, value in config.items()
                      if key in ("d", "eg", "e")})

    @property
    def eg_optimizer(self) -> keras.optimizers.Optimizer:
        return self.optimizer

    def _build_optimizers(self) -> None:
        # Each player's optimizer gets slots for its own variables only (Keras would otherwise give the main
        # optimizer slots for every trainable variable).
        if not self.built or self.d_optimizer is None or getattr(self, "optimizer", None) is None:
            return
        optimizers = self._optimizers()
        for key, variables in self._player_variables().items():
            if not optimizers[key].built:
                optimizers[key].build(variables)

    # ------------------------------------------------------------------------------------------------ training
    def sample_latent(self, batch: int, seed) -> tf.Tensor:
        """z ~ U(-1, 1)^latent_dim (Donahue et al. 2017), stateless."""
        return tf.random.stateless_uniform((batch, self.latent_dim), seed=seed, minval=-1.0, maxval=1.0,
                                           alg="philox")

    def _step_seed(self) -> tf.Tensor:
        seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int64),
                                                        self.optimizer.iterations, alg="philox")
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica is not None else 0
        return tf.random.experimental.stateless_fold_in(seed, replica_id, alg="philox")

    def train_step(self, data):
        x = tf.cast(unpack_patches(data), tf.float32)
        batch = tf.shape(x)[0]
        z = self.sample_latent(batch, self._step_seed())
        with tf.GradientTape(persistent=True) as tape:
            e_x = self.encode(x, training=True)
            g_z = self.generator(z, training=True)
            # One D pass over [real; fake] pairs (D has no BatchNorm, so the halves do not interact).
            logits = self.discriminator(
                [tf.concat([x, tf.cast(g_z, x.dtype)], 0), tf.concat([tf.cast(e_x, z.dtype), z], 0)], training=True
            )
            real_logits, fake_logits = logits[:batch], logits[batch:]
            d_loss, eg_loss = bigan_losses(real_logits, fake_logits)
            optimizers = self._optimizers()
            scaled = {key: self.scaled_loss(d_loss if key == "d" else eg_loss, opt) for key, opt in optimizers.items()}
        # Simultaneous updates of both players from the same forward pass.
        for key, variables in self._player_variables().items():
            self.minimize(scaled[key], tape, variables, optimizers[key])
        del tape
        acc_real = tf.reduce_mean(tf.cast(real_logits > 0, tf.float32))
        acc_fake = tf.reduce_mean(tf.cast(fake_logits < 0, tf.float32))
        for name, value in (("d_loss", d_loss), ("eg_loss", eg_loss), ("d_accuracy", (acc_real + acc_fake) / 2),
                            ("d_acc_real", acc_real), ("d_acc_fake", acc_fake)):
            self.trackers[name].update_state(value)
        return {name: m.result() for name, m in self.trackers.items()}

    def method_callbacks(self, context: FitContext) -> list[keras.callbacks.Callback]:
        """:class:`BiGANSamples` when the run has an output_dir."""
        if not context or not context.output_dir:
            return []
        return [BiGANSamples(context)]

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "latent_dim": self.latent_dim,
            "generator_width": self.generator_width,
            "discriminator_width": self.discriminator_width,
            "dropout": self.dropout,
            "spectral_norm": self.spectral_norm,
            "d_learning_rate": self.d_learning_rate,
            "eg_learning_rate": self.eg_learning_rate,
            "e_learning_rate": self.e_learning_rate,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        # A model.keras saved before the encoder had a rate of its own trained with E on G's optimizer.
        config = {"e_learning_rate": None, **config}
        return super().from_config(config, custom_objects=custom_objects)


def bigan_diagnostics(model: "BiGAN", x, seed: int = 0) -> dict[str, float]:
    """What a trained BiGAN's game looks like on patches ``x`` (in [0, 1]): whether E's codes live where z does,
    whether D judges pairs by their code at all, and whether E inverts G.

    E learns only through D's code branch: if D tells real pairs from fake ones by the image alone, E's gradient
    carries little about the image, and an adaptive optimizer still takes full-size steps on it. Returns:

    * ``code_std``: mean over code dimensions of E(x)'s spread over the patches (z ~ U(-1, 1): 1/√3 ≈ 0.577);
    * ``code_outside``: the fraction of E(x)'s entries outside [-1, 1], z's support; ``code_max_abs``;
    * ``d_real``, ``d_fake``: D's accuracy on (x, E(x)) and on (G(z), z);
    * ``d_real_random_code``: the fraction of (x, z') pairs, z' a fresh uniform draw, that D calls real. Near
      ``d_real``, D ignores the code on real images;
    * ``reconstruction_error``, ``random_code_error``: mean |x − G(E(x))| and mean |x − G(z')|. E inverts G only
      if the first is well below the second.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    batch = int(x.shape[0])
    codes = tf.cast(model.encode(x, training=False), tf.float32)
    z = model.sample_latent(batch, tf.constant([int(seed), 1], tf.int64))
    z_other = model.sample_latent(batch, tf.constant([int(seed), 2], tf.int64))

    def logits(images, code):
        return tf.cast(model.discriminator([tf.cast(images, x.dtype), tf.cast(code, z.dtype)], training=False),
                       tf.float32)

    fakes = tf.cast(model.generator(z, training=False), tf.float32)
    recon = tf.cast(model.generator(codes, training=False), tf.float32)
    random_recon = tf.cast(model.generator(z_other, training=False), tf.float32)
    values = {
        "code_std": tf.reduce_mean(tf.math.reduce_std(codes, axis=0)),
        "code_outside": tf.reduce_mean(tf.cast(tf.abs(codes) > 1.0, tf.float32)),
        "code_max_abs": tf.reduce_max(tf.abs(codes)),
        "d_real": tf.reduce_mean(tf.cast(logits(x, codes) > 0, tf.float32)),
        "d_fake": tf.reduce_mean(tf.cast(logits(fakes, z) < 0, tf.float32)),
        "d_real_random_code": tf.reduce_mean(tf.cast(logits(x, z_other) > 0, tf.float32)),
        "reconstruction_error": tf.reduce_mean(tf.abs(x - recon)),
        "random_code_error": tf.reduce_mean(tf.abs(x - random_recon)),
    }
    return {name: float(value) for name, value in values.items()}


class BiGANSamples(keras.callbacks.Callback):
    """Each epoch: ``output_dir/bigan_samples_epoch{E}.png`` (E from 1) with G(z) and x / G(E(x)) rows.

    Rows 1–2: samples G(z) for fixed z; row 3: fixed real patches x; row 4: their reconstructions G(E(x)).
    """

    def __init__(self, context: FitContext, columns: int = 8):
        super().__init__()
        self.output_dir = pathlib.Path(context.output_dir)
        self.context = context
        self.columns = int(columns)
        self._x = None
        self._z = None
        self.written: list[pathlib.Path] = []
        self.last_grid: np.ndarray | None = None  # (4·columns, S, S, 3): samples, reals, reconstructions

    def on_train_begin(self, logs=None):
        from keras_oneimage.data.synthetic import patch_dataset

        c = self.context
        stream = patch_dataset(c.images, image_size=c.image_size, batch_size=self.columns, augment=c.augment,
                               seed=int(c.seed) + 1)
        self._x = next(iter(stream))
        self._z = self.model.sample_latent(2 * self.columns, tf.constant([int(c.seed) % 2**31, 7], tf.int32))

    def on_epoch_end(self, epoch, logs=None):
        from keras_oneimage.plots import image_grid

        values = [v for k, v in (logs or {}).items() if k.endswith("loss")]
        if any(not math.isfinite(float(v)) for v in values):
            return  # diverged: run_training's guard reports it; do not draw NaN images
        model = self.model
        samples = model.generator(self._z, training=False)
        recon = model.generator(model.encode(self._x, training=False), training=False)
        grid = np.concatenate([np.asarray(samples), np.asarray(self._x), np.asarray(recon)], axis=0)
        path = self.output_dir / f"bigan_samples_epoch{epoch + 1}.png"
        os.makedirs(self.output_dir, exist_ok=True)
        image_grid(grid, path, title=f"epoch {epoch + 1}: G(z) | x | G(E(x))", ncols=self.columns)
        self.written.append(path)
        self.last_grid = grid
