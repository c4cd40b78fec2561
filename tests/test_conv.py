"""keras_oneimage.models.conv: Keras's Conv2D outputs and gradients, with a matmul filter gradient on small maps
(SmallMapConv2D) and strided first layers on space-to-depth blocks (SpaceToDepthConv2D)."""
import pathlib
import runpy

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage.models import conv as conv_module
from keras_oneimage.models.alexnet import AlexNet
from keras_oneimage.models.conv import SmallMapConv2D, SpaceToDepthConv2D
from keras_oneimage.precision import precision_scope


@pytest.fixture
def as_on_cpu(monkeypatch):
    """The layer's CPU rule, also on a machine with a GPU (the gradient's arithmetic is the same there)."""
    monkeypatch.setattr(conv_module, "_no_gpu", lambda: True)


def _pair(policy="float32", layer_class=SmallMapConv2D, **kwargs):
    """A stock Conv2D and one of ours with the same arguments and the same weights."""
    with precision_scope(policy):
        stock = keras.layers.Conv2D(**kwargs)
        ours = layer_class(**kwargs)
    return stock, ours


def _grads_of(layer, x, upstream):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    dx, *dws = tape.gradient(loss, [x, *layer.trainable_variables])
    return y.numpy().astype(np.float32), dx.numpy().astype(np.float32), [d.numpy() for d in dws]


@pytest.mark.parametrize("side,kernel,use_bias", [(4, 3, False), (8, 3, True), (7, 3, False), (5, 1, True)])
def test_same_outputs_and_gradients_as_keras_conv2d(side, kernel, use_bias, as_on_cpu):
    rng = np.random.RandomState(0)
    x = rng.randn(3, side, side, 6).astype("float32")
    stock, ours = _pair(filters=5, kernel_size=kernel, padding="same", use_bias=use_bias)
    stock.build(x.shape)
    ours.build(x.shape)
    ours.set_weights([w + rng.randn(*w.shape).astype("float32") * 0.1 for w in stock.get_weights()])
    stock.set_weights(ours.get_weights())
    assert ours._matmul_filter_grad_applies(tf.zeros(x.shape))
    upstream = rng.randn(3, side, side, 5).astype("float32")
    (y, dx, dws), (y_ref, dx_ref, dws_ref) = _grads_of(ours, x, upstream), _grads_of(stock, x, upstream)
    assert len(dws) == len(dws_ref) == (2 if use_bias else 1)
    for got, want in zip([y, dx, *dws], [y_ref, dx_ref, *dws_ref]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_matmul_filter_gradient_is_used_and_matches_under_bfloat16(as_on_cpu):
    """Under mixed_bfloat16 the kernel gradient (float32, through the cast) matches the stock layer's to bf16
    rounding, and the custom path is the one that ran (its gradient graph has MatMul ops, no
    Conv2DBackpropFilter)."""
    rng = np.random.RandomState(1)
    x = rng.randn(4, 8, 8, 16).astype("float32")
    stock, ours = _pair("mixed_bfloat16", filters=8, kernel_size=3, padding="same", use_bias=False)
    stock.build(x.shape)
    ours.build(x.shape)
    stock.set_weights(ours.get_weights())
    upstream = rng.randn(4, 8, 8, 8).astype("float32")
    _, _, (dw_ours,) = _grads_of(ours, x, upstream)
    _, _, (dw_stock,) = _grads_of(stock, x, upstream)
    assert dw_ours.dtype == np.float32
    scale = np.abs(dw_stock).max()
    np.testing.assert_allclose(dw_ours / scale, dw_stock / scale, atol=2e-2)

    @tf.function
    def grad_graph(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(ours(x), tf.float32))
        return tape.gradient(loss, ours.trainable_variables)

    ops = {op.type for op in grad_graph.get_concrete_function(tf.constant(x)).graph.get_operations()}
    assert "Conv2DBackpropFilter" not in ops and {"MatMul", "BatchMatMulV2"} & ops


@pytest.mark.parametrize("kwargs,shape", [
    (dict(strides=2, padding="same"), (2, 8, 8, 3)),
    (dict(padding="valid"), (2, 8, 8, 3)),
    (dict(padding="same", dilation_rate=2), (2, 8, 8, 3)),
    (dict(padding="same"), (2, conv_module.MATMUL_FILTER_GRAD_MAX_SIDE + 1, 4, 3)),
    (dict(padding="same"), (2, None, None, 3)),
], ids=["stride-2", "valid", "dilated", "large-map", "unknown-size"])
def test_other_convolutions_keep_keras_path(kwargs, shape):
    layer = SmallMapConv2D(filters=4, kernel_size=3, **kwargs)
    assert not layer._matmul_filter_grad_applies(keras.KerasTensor(shape))


@pytest.mark.parametrize("kernel", [2, conv_module.MATMUL_FILTER_GRAD_MAX_KERNEL + 2])
def test_even_or_large_kernel_keeps_keras_path(kernel):
    layer = SmallMapConv2D(filters=4, kernel_size=kernel, padding="same")
    assert not layer._matmul_filter_grad_applies(keras.KerasTensor((2, 4, 4, 3)))


def test_alexnet_uses_it_and_round_trips(tmp_path):
    """AlexNet's conv blocks are SmallMapConv2D (conv3-5 of a 32 px cifar trunk get the matmul gradient), and a
    saved trunk reloads with the same weights and outputs."""
    keras.utils.set_random_seed(0)
    model = AlexNet("cifar", 32, widths=(8, 16, 24, 24, 16))
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype("float32")
    y = model(x)
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(isinstance(c, SmallMapConv2D) for c in convs)
    model.save(tmp_path / "t.keras")
    loaded = keras.saving.load_model(tmp_path / "t.keras")
    np.testing.assert_allclose(loaded(x).numpy(), y.numpy(), rtol=1e-5, atol=1e-5)


def test_filter_gradient_benchmark_runs_and_agrees():
    """experiments/bench_filter_grad.py --quick: both ways run at every AlexNet shape and give the same gradient."""
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_filter_grad.py"
    rows = runpy.run_path(str(script), run_name="bench_filter_grad")["main"](["--quick", "--dtype", "float32"])
    assert len(rows) == 10 and {r["side"] for r in rows} >= {4, 8, 16}
    for row in rows:
        assert row["tf_ms"] > 0 and row["matmul_ms"] > 0
        assert row["max_rel_diff"] < 1e-4, row


def test_a_visible_gpu_keeps_keras_path(monkeypatch):
    """The matmul gradient was measured on CPUs only; with a GPU visible, cuDNN's own kernel stays."""
    layer = SmallMapConv2D(filters=4, kernel_size=3, padding="same")
    shape = keras.KerasTensor((2, 4, 4, 3))
    monkeypatch.setattr(conv_module, "_no_gpu", lambda: True)
    assert layer._matmul_filter_grad_applies(shape)
    monkeypatch.setattr(conv_module, "_no_gpu", lambda: False)
    assert not layer._matmul_filter_grad_applies(shape)


# ------------------------------------------------------------------------------------------- SpaceToDepthConv2D
@pytest.mark.parametrize("shape,kernel,stride,padding,use_bias", [
    ((2, 132, 132, 3), 11, 4, "valid", False),  # the ImageNet stem at 128 px (after its 2 px zero padding)
    ((2, 128, 128, 3), 11, 4, "valid", False),  # the last rows and columns are cropped: no output reads them
    ((2, 37, 41, 3), 11, 4, "same", True),  # odd, unequal sides; "same" pads unevenly
    ((2, 30, 29, 2), 7, 4, "valid", False),  # Sobel's two channels
    ((3, 33, 33, 1), 3, 3, "same", True),  # kernel = stride: no zero taps
    ((2, 20, 20, 3), 5, 3, "valid", False),
])
def test_space_to_depth_same_outputs_and_gradients_as_keras_conv2d(shape, kernel, stride, padding, use_bias,
                                                                    as_on_cpu):
    rng = np.random.RandomState(2)
    x = rng.rand(*shape).astype("float32")
    stock, ours = _pair(layer_class=SpaceToDepthConv2D, filters=5, kernel_size=kernel, strides=stride,
                        padding=padding, use_bias=use_bias)
    stock.build(x.shape)
    ours.build(x.shape)
    ours.set_weights([w + rng.randn(*w.shape).astype("float32") * 0.1 for w in stock.get_weights()])
    stock.set_weights(ours.get_weights())
    assert ours._space_to_depth_applies(tf.zeros(x.shape))
    y_shape = stock.compute_output_shape(x.shape)
    upstream = rng.randn(*y_shape).astype("float32")
    (y, dx, dws), (y_ref, dx_ref, dws_ref) = _grads_of(ours, x, upstream), _grads_of(stock, x, upstream)
    assert y.shape == y_ref.shape == y_shape and len(dws) == len(dws_ref) == (2 if use_bias else 1)
    for got, want in zip([y, dx, *dws], [y_ref, dx_ref, *dws_ref]):
        scale = max(1.0, np.abs(want).max())  # filter gradients sum thousands of products
        np.testing.assert_allclose(got / scale, want / scale, rtol=1e-5, atol=1e-5)


def test_space_to_depth_runs_a_stride_1_convolution_of_blocks(as_on_cpu):
    """The path that ran is the blocked one: a SpaceToDepth op and a stride-1 Conv2D of s·s·C channels."""
    layer = SpaceToDepthConv2D(filters=4, kernel_size=11, strides=4, padding="valid", use_bias=False)
    x = tf.zeros((1, 67, 67, 3))
    layer.build(x.shape)
    graph = tf.function(layer).get_concrete_function(x).graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert any(op.type == "SpaceToDepth" for op in graph.get_operations())
    assert [tuple(op.get_attr("strides")) for op in convs] == [(1, 1, 1, 1)]
    assert convs[0].inputs[1].shape.as_list() == [3, 3, 48, 4]  # ceil(11 / 4) blocks, 4·4·3 channels


@pytest.mark.parametrize("kwargs,shape", [
    (dict(strides=2, padding="same"), (2, 64, 64, 3)),  # the 64 px cifar stem: tied, so Conv2D's op stays
    (dict(strides=4, padding="valid"), (2, 64, 64, conv_module.SPACE_TO_DEPTH_MAX_CHANNELS + 1)),
    (dict(strides=4, padding="valid", dilation_rate=1, groups=1), (2, None, None, 3)),
    (dict(strides=(4, 3), padding="valid"), (2, 64, 64, 3)),
    (dict(strides=1, padding="same"), (2, 16, 16, 3)),
], ids=["stride-2", "many-channels", "unknown-size", "unequal-strides", "stride-1"])
def test_other_convolutions_keep_keras_op(kwargs, shape, as_on_cpu):
    layer = SpaceToDepthConv2D(filters=4, kernel_size=5, **kwargs)
    assert not layer._space_to_depth_applies(keras.KerasTensor(shape))


def test_space_to_depth_keeps_keras_op_with_a_gpu_visible(monkeypatch):
    layer = SpaceToDepthConv2D(filters=4, kernel_size=11, strides=4)
    shape = keras.KerasTensor((2, 132, 132, 3))
    monkeypatch.setattr(conv_module, "_no_gpu", lambda: True)
    assert layer._space_to_depth_applies(shape)
    monkeypatch.setattr(conv_module, "_no_gpu", lambda: False)
    assert not layer._space_to_depth_applies(shape)


def test_imagenet_stem_uses_it_computes_as_conv2d_and_round_trips(tmp_path, monkeypatch, as_on_cpu):
    """The ImageNet AlexNet's conv1 (11x11 stride 4) is a SpaceToDepthConv2D, conv2-5 SmallMapConv2D; the trunk
    computes what the same trunk with a stock Conv2D conv1 computes from the same weights, and reloads."""
    from keras_oneimage.models import alexnet

    keras.utils.set_random_seed(0)
    widths = (8, 16, 24, 24, 16)
    model = AlexNet("imagenet", 128, widths=widths)
    x = np.random.RandomState(0).rand(2, 128, 128, 3).astype("float32")
    y = model(x)
    assert type(model.get_layer("conv1").conv) is SpaceToDepthConv2D
    assert {type(model.get_layer(f"conv{i}").conv) for i in range(2, 6)} == {SmallMapConv2D}
    monkeypatch.setattr(alexnet, "SpaceToDepthConv2D", keras.layers.Conv2D)
    stock = AlexNet("imagenet", 128, widths=widths)
    stock(x)
    assert type(stock.get_layer("conv1").conv) is keras.layers.Conv2D
    stock.set_weights(model.get_weights())
    np.testing.assert_allclose(stock(x).numpy(), y.numpy(), rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    model.save(tmp_path / "t.keras")
    loaded = keras.saving.load_model(tmp_path / "t.keras")
    assert type(loaded.get_layer("conv1").conv) is SpaceToDepthConv2D
    np.testing.assert_allclose(loaded(x).numpy(), y.numpy(), rtol=1e-5, atol=1e-5)


def test_stem_benchmark_runs_and_agrees():
    """experiments/bench_stem.py --quick: both ways run at every stem shape and give the same output and gradient."""
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "bench_stem.py"
    rows = runpy.run_path(str(script), run_name="bench_stem")["main"](["--quick", "--dtype", "float32"])
    assert [r["stride"] for r in rows] == [2, 4, 4]
    for row in rows:
        assert row["conv2d_ms"] > 0 and row["space_to_depth_ms"] > 0
        assert row["max_rel_diff_output"] < 1e-5 and row["max_rel_diff_filter_grad"] < 1e-5, row
