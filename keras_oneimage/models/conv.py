"""Two ``Conv2D`` layers that compute AlexNet's convolutions faster on CPUs, with Keras's weights and config
(issue #15): :class:`SmallMapConv2D` (conv2-conv5) and :class:`SpaceToDepthConv2D` (the strided conv1).

**Small maps.** A ``Conv2D`` whose filter gradient on small feature maps is computed as k·k matmuls.

For a stride-1 "same" convolution the filter gradient is, for each kernel offset ``(i, j)``,
``dW[i, j] = X_pad[:, i:i+H, j:j+W, :]ᵀ · dY`` with both sides flattened to ``(N·H·W, C)``: k·k plain matmuls.
On AlexNet's 4x4 to 8x8 conv3-conv5 maps (3x3 kernels) oneDNN's direct backward-weights kernel
(``Conv2DBackpropFilter``) is 1.3-3.9x slower than those matmuls on the AMX Xeon (docs/performance.md); on conv2
(5x5 kernels, 8x8 to 16x16 maps) it is as fast or faster, so the layer keeps TensorFlow's own gradient there, and
on a GPU, where nothing was measured, cuDNN keeps its own everywhere. The forward pass and the gradient with
respect to the input are TensorFlow's own ops in every case, and the filter gradient is the same sum in another
order, so what the layer learns does not change beyond rounding.

**Strided stems.** A stride-s convolution of a few input channels (conv1: 3 colour channels, 11x11 stride 4 in
the ImageNet stem) is the same sum as a stride-1 convolution of the input's s x s space-to-depth blocks
(``s·s·C_in`` channels) with the kernel zero-padded to a multiple of s and regrouped the same way (the
"space-to-depth stem" of TPU ResNet trainings). oneDNN's kernels fill the AMX tiles poorly from 3 input channels
and better from 48: on a quiet 2-core AMX Xeon the forward pass and filter gradient together ran 1.09x faster at
128 px and 1.17x at 224 px, the whole RotNet step 2.5-3.9 % faster at 128 px (docs/performance.md); at 64 px (5x5
stride 2, 12 channels) they tie, and the layer keeps ``Conv2D``'s op there.
"""
from __future__ import annotations

import functools

import keras

#: The largest feature-map side (height and width, before padding) that gets the matmul filter gradient: on
#: AlexNet's 3x3 convolutions it was faster than ``Conv2DBackpropFilter`` on every map up to 8x8, on conv2's 15x15 and
#: 16x16 maps 3x slower (experiments/bench_filter_grad.py, docs/performance.md).
MATMUL_FILTER_GRAD_MAX_SIDE = 8
#: The largest kernel that gets it: a 5x5 kernel is 25 matmuls, which only tied oneDNN's kernel on conv2's 8x8 map.
MATMUL_FILTER_GRAD_MAX_KERNEL = 3


#: The most input channels that get the space-to-depth formulation: it pays where oneDNN's kernel is starved for
#: channels (colour or Sobel input); a deeper layer's strided convolution has enough of its own.
SPACE_TO_DEPTH_MAX_CHANNELS = 4
#: The smallest stride that gets it: at stride 2 (the 64 px cifar stem) it tied Conv2D's op (0.99x quiet, 1.03x loaded).
SPACE_TO_DEPTH_MIN_STRIDE = 3


@functools.lru_cache(maxsize=1)
def _no_gpu() -> bool:
    """True when TensorFlow sees no GPU: both levers were measured, and pay, on CPUs only."""
    import tensorflow as tf

    return not tf.config.list_logical_devices("GPU")


def matmul_filter_grad(x, dy, kernel_size: int):
    """The filter gradient ``(k, k, C_in, C_out)`` of a stride-1 "same" NHWC convolution with an odd ``k``x``k``
    kernel, as k·k matmuls ``X_pad[:, i:i+H, j:j+W, :]ᵀ · dY`` over the ``N·H·W`` positions."""
    import tensorflow as tf

    k, pad = kernel_size, kernel_size // 2
    h, w, cin, cout = x.shape[1], x.shape[2], x.shape[3], dy.shape[3]
    x_pad = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    dy_rows = tf.reshape(dy, [-1, cout])
    taps = [tf.matmul(tf.reshape(x_pad[:, i:i + h, j:j + w, :], [-1, cin]), dy_rows, transpose_a=True)
            for i in range(k) for j in range(k)]
    return tf.reshape(tf.stack(taps), [k, k, cin, cout])


def _conv2d_same_with_matmul_filter_grad(x, kernel):
    """``tf.nn.conv2d(x, kernel, 1, "SAME")`` (NHWC, odd square kernel) whose filter gradient is k·k matmuls."""
    import tensorflow as tf

    @tf.custom_gradient
    def conv(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides=1, padding="SAME")

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                strides=[1, 1, 1, 1], padding="SAME")
            return dx, matmul_filter_grad(x, dy, kernel.shape[0])

        return y, grad

    # Read the variable (and cast it, under a mixed policy) outside the custom gradient, which then sees tensors
    # only; the gradient flows on through the read to the variable as usual.
    return conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))


@keras.saving.register_keras_serializable(package="keras_oneimage")
class SmallMapConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` (same arguments, weights and config) with the matmul filter gradient on small maps.

    The faster gradient applies under the TensorFlow backend, with no GPU visible, to stride-1, undilated,
    ungrouped, channels-last "same" convolutions with an odd square kernel of at most
    :data:`MATMUL_FILTER_GRAD_MAX_KERNEL` whose input's height and width are known and at most
    :data:`MATMUL_FILTER_GRAD_MAX_SIDE`; every other call is ``keras.layers.Conv2D``'s.
    """

    def _matmul_filter_grad_applies(self, inputs) -> bool:
        shape = getattr(inputs, "shape", None)
        kh, kw = self.kernel_size
        return (keras.backend.backend() == "tensorflow" and _no_gpu() and self.padding == "same" and self.groups == 1
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1)
                and self.data_format == "channels_last" and kh == kw and kh % 2 == 1
                and kh <= MATMUL_FILTER_GRAD_MAX_KERNEL
                and shape is not None and len(shape) == 4
                and all(s is not None and s <= MATMUL_FILTER_GRAD_MAX_SIDE for s in shape[1:3]))

    def convolution_op(self, inputs, kernel):
        if self._matmul_filter_grad_applies(inputs):
            return _conv2d_same_with_matmul_filter_grad(inputs, kernel)
        return super().convolution_op(inputs, kernel)


def space_to_depth_conv2d(x, kernel, stride: int, padding: str):
    """``tf.nn.conv2d(x, kernel, stride, padding)`` (NHWC, square kernel and stride, ``padding`` "VALID" or "SAME")
    computed as a stride-1 "VALID" convolution of ``x``'s ``stride`` x ``stride`` space-to-depth blocks.

    The input is padded (or cropped) to whole blocks covering what the strided convolution reads, and the kernel is
    zero-padded to ``kb = ceil(k / stride)`` blocks and regrouped like the input: output pixel ``(p, q)`` then sums
    blocks ``p … p+kb-1``, i.e. the pixels ``p·s … p·s+kb·s-1`` of which the original kernel reads the first k.
    """
    import tensorflow as tf

    s, k = int(stride), int(kernel.shape[0])
    size_h, size_w, cin, cout = x.shape[1], x.shape[2], kernel.shape[2], kernel.shape[3]
    kb = -(-k // s)

    def plan(size):  # (zeros before, output side, zeros after: negative = crop)
        if padding == "SAME":
            out = -(-size // s)
            before = max((out - 1) * s + k - size, 0) // 2
        else:
            out, before = (size - k) // s + 1, 0
        return before, out, (out - 1 + kb) * s - size - before

    top, out_h, bottom = plan(size_h)
    left, out_w, right = plan(size_w)
    x = tf.pad(x, [[0, 0], [top, max(bottom, 0)], [left, max(right, 0)], [0, 0]])
    x = x[:, :(out_h - 1 + kb) * s, :(out_w - 1 + kb) * s, :]  # crop rows and columns no output reads
    blocks = tf.nn.space_to_depth(x, s)
    kernel = tf.pad(kernel, [[0, kb * s - k], [0, kb * s - k], [0, 0], [0, 0]])
    # (kb·s, kb·s, C, O) -> (kb, s, kb, s, C, O) -> (kb, kb, s, s, C, O): space_to_depth's channel order is
    # (row in block, column in block, channel)
    kernel = tf.transpose(tf.reshape(kernel, [kb, s, kb, s, cin, cout]), [0, 2, 1, 3, 4, 5])
    return tf.nn.conv2d(blocks, tf.reshape(kernel, [kb, kb, s * s * cin, cout]), strides=1, padding="VALID")


@keras.saving.register_keras_serializable(package="keras_oneimage")
class SpaceToDepthConv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` (same arguments, weights and config) computed on space-to-depth blocks when strided.

    Applies under the TensorFlow backend, with no GPU visible, to undilated, ungrouped, channels-last convolutions
    with a square kernel, equal strides of at least :data:`SPACE_TO_DEPTH_MIN_STRIDE`, at most
    :data:`SPACE_TO_DEPTH_MAX_CHANNELS` input channels and a known input height and width; every other call is
    ``keras.layers.Conv2D``'s. Gradients are TensorFlow's own, through the regrouping.
    """

    def _space_to_depth_applies(self, inputs) -> bool:
        shape = getattr(inputs, "shape", None)
        kh, kw = self.kernel_size
        sh, sw = self.strides
        return (keras.backend.backend() == "tensorflow" and _no_gpu() and self.groups == 1
                and tuple(self.dilation_rate) == (1, 1) and self.data_format == "channels_last"
                and kh == kw and sh == sw and sh >= SPACE_TO_DEPTH_MIN_STRIDE
                and shape is not None and len(shape) == 4 and shape[1] is not None and shape[2] is not None
                and shape[3] is not None and shape[3] <= SPACE_TO_DEPTH_MAX_CHANNELS)

    def convolution_op(self, inputs, kernel):
        if self._space_to_depth_applies(inputs):
            return space_to_depth_conv2d(inputs, kernel, self.strides[0], self.padding.upper())
        return super().convolution_op(inputs, kernel)
