"""A ``Conv2D`` whose filter gradient on small feature maps is computed as k·k matmuls (issue #15).

For a stride-1 "same" convolution the filter gradient is, for each kernel offset ``(i, j)``,
``dW[i, j] = X_pad[:, i:i+H, j:j+W, :]ᵀ · dY`` with both sides flattened to ``(N·H·W, C)``: k·k plain matmuls.
On AlexNet's 4x4 to 8x8 conv3-conv5 maps (3x3 kernels) oneDNN's direct backward-weights kernel
(``Conv2DBackpropFilter``) is 1.3-3.9x slower than those matmuls on the AMX Xeon (docs/performance.md); on conv2
(5x5 kernels, 8x8 to 16x16 maps) it is as fast or faster, so the layer keeps TensorFlow's own gradient there, and
on a GPU, where nothing was measured, cuDNN keeps its own everywhere. The forward pass and the gradient with
respect to the input are TensorFlow's own ops in every case, and the filter gradient is the same sum in another
order, so what the layer learns does not change beyond rounding.
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


@functools.lru_cache(maxsize=1)
def _no_gpu() -> bool:
    """True when TensorFlow sees no GPU: the matmul gradient was measured, and pays, on CPUs only."""
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
