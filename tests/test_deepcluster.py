"""DeepCluster: the Sobel front end, balanced sampling, head reset, wiring into `fit`, a short run on a photograph."""
import numpy as np
import pytest
import tensorflow as tf

import keras
from keras_oneimage.errors import InputError
from keras_oneimage.methods import registry
from keras_oneimage.methods.base import FitContext
from keras_oneimage.methods.deepcluster import (
    DeepCluster,
    _PoolState,
    balanced_order,
    pseudo_label_loss,
    reset_optimizer_slots,
)
from keras_oneimage.models import AlexNet
from keras_oneimage.models.sobel import GRAY_WEIGHTS, Sobel

SMALL = (16, 32, 32, 32, 16)


def _step_image(size=12, edge=6, axis=1, low=0.2, high=0.7, channels=(1.0, 1.0, 1.0)):
    """An image that jumps from ``low`` to ``high`` at index ``edge`` along ``axis`` (1: x, 0: y)."""
    ramp = np.where(np.arange(size) >= edge, high, low).astype(np.float32)
    plane = np.tile(ramp[None, :], (size, 1)) if axis == 1 else np.tile(ramp[:, None], (1, size))
    return plane[None, :, :, None] * np.asarray(channels, np.float32)


def test_sobel_on_a_step_image_has_the_right_sign_and_magnitude():
    # DeepCluster's filter (their Sobel conv weights [[1, 0, -1], [2, 0, -2], [1, 0, -1]], applied by correlation,
    # as torch and Keras convolutions do): a dark→bright step along +x gives -4·step in the two columns beside
    # the edge, 0 elsewhere inside the image, and no y response.
    step = 0.5
    out = Sobel()(_step_image(axis=1)).numpy()[0]
    inner = out[1:-1]  # rows away from the zero-padded border
    np.testing.assert_allclose(inner[:, 5:7, 0], -4 * step, atol=1e-5)
    np.testing.assert_allclose(inner[:, 1:5, 0], 0.0, atol=1e-5)
    np.testing.assert_allclose(inner[:, 7:-1, 0], 0.0, atol=1e-5)
    np.testing.assert_allclose(inner[:, 1:-1, 1], 0.0, atol=1e-5)
    # the same step along +y (downwards) moves to the second channel with the same sign convention
    out = Sobel()(_step_image(axis=0)).numpy()[0]
    np.testing.assert_allclose(out[5:7, 1:-1, 1], -4 * step, atol=1e-5)
    np.testing.assert_allclose(out[1:-1, 1:-1, 0], 0.0, atol=1e-5)
    # a bright→dark step flips the sign
    flipped = Sobel()(_step_image(axis=1, low=0.7, high=0.2)).numpy()[0]
    np.testing.assert_allclose(flipped[1:-1, 5:7, 0], 4 * step, atol=1e-5)
    # colour enters through the luma weights: a step in red alone has 0.299 of the gray response
    for c, weight in enumerate(GRAY_WEIGHTS):
        one = np.eye(3, dtype=np.float32)[c]
        out = Sobel()(_step_image(axis=1, channels=one)).numpy()[0]
        np.testing.assert_allclose(out[1:-1, 5:7, 0], -4 * step * weight, atol=1e-5)


def test_deepcluster_trunk_sees_sobel_gradients_of_the_normalised_input():
    assert DeepCluster.backbone_options == {"sobel": True}
    backbone = AlexNet("cifar", 32, widths=SMALL, **DeepCluster.backbone_options, std=(0.5, 0.25, 0.2))
    x = _step_image(size=32, edge=16, axis=1, low=0.2, high=0.7)
    pre = backbone.preprocess(x).numpy()[0]
    # the per-channel mean cancels (Sobel rows sum to 0); each channel's step is divided by its std
    expected = -4 * 0.5 * sum(w / s for w, s in zip(GRAY_WEIGHTS, (0.5, 0.25, 0.2)))
    np.testing.assert_allclose(pre[1:-1, 15:17, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(pre[1:-1, 1:14, 0], 0.0, atol=1e-5)


def test_pseudo_label_loss():
    labels = tf.constant([0, 2, 1])
    assert float(pseudo_label_loss(labels, tf.zeros((3, 5)))) == pytest.approx(np.log(5), rel=1e-6)
    confident = tf.one_hot(labels, 5) * 20.0
    assert float(pseudo_label_loss(labels, confident)) < 1e-6
    assert float(pseudo_label_loss(labels, tf.roll(confident, 1, axis=1))) > 19.0  # confidently wrong


def test_balanced_order_gives_every_nonempty_cluster_the_same_share():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 90 + [3] * 9 + [7] * 1)  # very unequal; clusters 1, 2, 4-6 are empty
    order = balanced_order(labels, 100, rng)
    assert order.shape == (100,) and order.dtype == np.int32
    assert order.min() >= 0 and order.max() < 100
    counts = np.bincount(labels[order], minlength=8)
    assert set(np.flatnonzero(counts)) == {0, 3, 7}
    assert counts[[0, 3, 7]].max() - counts[[0, 3, 7]].min() <= 1  # 34/33/33
    assert len(set(order[labels[order] == 0])) == counts[0]  # large cluster: drawn without replacement
    assert not np.array_equal(order, balanced_order(labels, 100, np.random.default_rng(1)))


def test_reset_optimizer_slots_zeroes_only_the_given_variables():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")])
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    head = model.get_layer("b")
    assert reset_optimizer_slots(opt, [head.kernel, head.bias]) == 2
    slots = {v.name: float(tf.reduce_sum(tf.abs(v))) for v in opt.variables if "momentum" in v.name}
    assert slots and all((v == 0.0) == ("_b_" in f"_{k}") for k, v in slots.items()), slots


def test_registry_options_and_errors():
    assert registry.get("DeepCluster") is DeepCluster
    with pytest.raises(InputError, match="num_clusters"):
        DeepCluster(AlexNet("cifar", 32, sobel=True, widths=SMALL), num_clusters=50, pool_size=20)
    with pytest.raises(InputError, match="pool_size"):
        DeepCluster(AlexNet("cifar", 32, sobel=True, widths=SMALL), pool_size=0)
    model = DeepCluster(AlexNet("cifar", 32, sobel=True, widths=SMALL), num_clusters=4, pool_size=16)
    with pytest.raises(InputError, match="make_dataset"):
        model.recluster(seed=0)


def test_short_run_on_a_photo(photo_path, tmp_path):
    from keras_oneimage.data.images import load_image

    keras.utils.set_random_seed(0)
    k, epochs, steps, batch = 10, 3, 48, 32
    model = DeepCluster(AlexNet("cifar", 32, sobel=True, widths=(32, 64, 64, 64, 32)), num_clusters=k,
                        pool_size=512, kmeans_iterations=10, head_widths=(128,))
    context = FitContext(images=[load_image(photo_path)], image_size=32, batch_size=batch, seed=0, augment=None,
                         steps_per_epoch=steps, epochs=epochs, output_dir=None)
    data = model.make_dataset(context)
    assert data.element_spec.dtype == tf.int32 and data.element_spec.shape.as_list() == [batch]
    pool = model._state.pool.numpy()
    assert pool.shape == (512, 32, 32, 3) and pool.dtype == np.uint8 and pool.std() > 10

    model.compile(optimizer=model.default_optimizer())
    callbacks = model.method_callbacks(context)
    history = model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=0,
                        shuffle=False).history

    assert np.all(np.isfinite(history["loss"]))
    acc = history["accuracy"]
    # The pseudo-labels are learnable: every epoch (fresh labels each time) is trained well above chance (1/k).
    # Not monotone: each reclustering hands the head new labels (seeds 0-3 on an AMX Xeon: 1.7-3.1x chance).
    assert min(acc) > 1.5 / k and np.mean(acc) > 1.8 / k, acc
    # NMI between successive assignments: 0 at the first epoch (vs the one-cluster start), then a proper NMI
    nmi = history["nmi"]
    assert len(nmi) == epochs and nmi[0] == 0.0
    assert all(0.0 < v <= 1.0 for v in nmi[1:]), nmi
    assert history["clusters"] == [float(k)] * epochs
    stats = callbacks[0].history
    assert [s["epoch"] for s in stats] == list(range(epochs))
    np.testing.assert_allclose([s["nmi"] for s in stats], nmi, atol=1e-6)

    # the head was re-initialised at the last re-clustering and has trained since; reset puts it back to init scale
    kernel = model.head.layers[-1].kernel
    model.reset_head(seed=1)
    assert float(tf.math.reduce_std(kernel)) == pytest.approx(0.01, rel=0.1)
    assert float(tf.reduce_max(tf.abs(model.head.layers[-1].bias))) == 0.0

    # model.keras round trip (the pool is not part of the checkpoint)
    x = tf.cast(model._state.pool[:4], tf.float32) / 255.0
    model.save(tmp_path / "dc.keras")
    state_bytes = sum(np.asarray(v).nbytes for v in [*model.weights, *model.optimizer.variables])
    assert (tmp_path / "dc.keras").stat().st_size < state_bytes + pool.nbytes // 2  # weights yes, pool no
    loaded = keras.saving.load_model(tmp_path / "dc.keras")
    assert isinstance(loaded, DeepCluster) and loaded.num_clusters == k and loaded.backbone.sobel
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-4, atol=1e-4)


def test_collapsed_features_warn_and_report_one_cluster():
    # Same feature and cluster shapes as the short run above, so the compiled k-means is reused.
    model = DeepCluster(AlexNet("cifar", 32, sobel=True, widths=SMALL), num_clusters=10, pool_size=512)
    model.build()
    model._state = _PoolState(np.zeros((512, 32, 32, 3), np.uint8))
    model.pool_features = lambda: tf.ones((512, 512))  # every patch has the same feature: the trivial solution
    with pytest.warns(RuntimeWarning, match="only 1 of 10 clusters"):
        stats = model.recluster(seed=0)
    assert stats["clusters"] == 1.0 and float(model._state.nonempty) == 1.0


def test_run_training_logs_nmi_and_checkpoints(photo_path, tmp_path):
    """What `fit` does with a DeepCluster: its dataset, its callbacks, history.csv with the clustering columns."""
    import csv

    from keras_oneimage.data.images import load_image
    from keras_oneimage.training import run_training

    keras.utils.set_random_seed(1)
    model = DeepCluster(AlexNet("cifar", 32, sobel=True, widths=SMALL), num_clusters=4, pool_size=32,
                        kmeans_iterations=3)
    context = FitContext(images=[load_image(photo_path)], image_size=32, batch_size=8, seed=1, augment=None,
                         steps_per_epoch=2, epochs=2, output_dir=str(tmp_path))
    run_training(model, model.make_dataset(context), epochs=2, steps_per_epoch=2, output_dir=tmp_path,
                 context=context, verbose=0)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert {"loss", "accuracy", "nmi", "clusters"} <= set(rows[0])
    assert float(rows[0]["nmi"]) == 0.0 and 0.0 <= float(rows[1]["nmi"]) <= 1.0
    assert (tmp_path / "model.keras").exists()


def test_sobel_option_builds_a_colour_trunk_and_round_trips(photo_path, tmp_path):
    """`fit(..., method="deepcluster", sobel=False)`: the method option reaches the trunk (3 input channels), the
    method records it, and model.keras reloads it; Caron et al.'s Sobel trunk stays the default."""
    from keras_oneimage import trainer

    def built(**options):
        run = trainer.prepare_run(photo_path, "deepcluster", image_size=32, widths=SMALL,
                                  method_options={"num_clusters": 4, "pool_size": 16, **options})
        model = trainer.build_method(run)
        model(np.zeros((1, 32, 32, 3), "float32"))
        return model

    default, colour = built(), built(sobel=False)
    assert default.sobel and default.backbone.sobel
    assert default.backbone.get_layer("conv1").conv.kernel.shape[2] == 2  # Sobel: two gradient channels
    assert not colour.sobel and not colour.backbone.sobel
    assert colour.backbone.get_layer("conv1").conv.kernel.shape[2] == 3  # RGB
    colour.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert reloaded.sobel is False and reloaded.backbone.sobel is False


def test_sobel_option_must_match_the_trunk():
    with pytest.raises(InputError, match="sobel=True"):
        DeepCluster(AlexNet("cifar", 32, sobel=False, widths=SMALL), num_clusters=4, pool_size=16)
    with pytest.raises(InputError, match="sobel must be True or False"):
        DeepCluster(AlexNet("cifar", 32, sobel=True, widths=SMALL), num_clusters=4, pool_size=16, sobel="no")
    model = DeepCluster(AlexNet("cifar", 32, sobel=False, widths=SMALL), num_clusters=4, pool_size=16, sobel=False)
    assert model.get_config()["sobel"] is False
