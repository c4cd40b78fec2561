"""`FusedSGD`: Keras's SGD whose TensorFlow update of each weight is one fused kernel instead of an op chain.

Keras 3's ``SGD`` on the TensorFlow backend updates a weight as two chains of element-wise ops: the decoupled
weight decay (``w * wd``, ``* lr``, subtract, assign) and then the momentum step (``m * momentum``, ``g * lr``,
subtract, assign ``m``, add to the weight). Each op is a separate pass over weight-sized tensors; together ~8 % of
a bf16 RotNet step on CPU (docs/performance.md). `FusedSGD` computes the same expressions in the same order, for
each weight, in one XLA-compiled function (``jit_compile=True``): XLA fuses them into one loop that reads
``w``, ``m`` and ``g`` once and writes ``w`` and ``m`` once. TensorFlow's own fused kernel
(``ResourceApplyKerasMomentum``) covers the momentum step but not the decay, so it still needs a second pass per
weight; measured against both, the one-loop update was the faster (docs/performance.md, "fused SGD update").

The arithmetic is Keras's (``SGD.update_step`` and ``Optimizer._apply_weight_decay``):

    w = w - w * wd * lr                  (weights not excluded by ``exclude_from_weight_decay``)
    m = m * momentum - g * lr            (momentum > 0)
    w = w + m                            (or, nesterov: w = w + (m * momentum - g * lr))
    w = w - g * lr                       (momentum 0)

XLA may contract a multiply-add into an FMA, so a weight can differ from Keras's in the last bit.

Everything else is Keras's ``SGD``: arguments, config (a ``model.keras`` reloads it), slot variables (named
``momentum`` as Keras's), clipping, EMA, gradient accumulation, loss scaling. Where the fused update does not
apply, a weight gets Keras's own code: other backends, sparse (``IndexedSlices``) gradients, dtypes other than
float16/bfloat16/float32/float64, and tf.distribute (mirrored) variables, whose per-replica components only
Keras's distribution-aware update resolves.
"""
from __future__ import annotations

import weakref

import keras

_FUSED_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Each optimizer's compiled updates, kept outside the optimizer so that Keras/TF do not track them as its state.
# Per optimizer, not global: a trace holds on to the variables it was traced with.
_UPDATES: "weakref.WeakKeyDictionary[FusedSGD, dict]" = weakref.WeakKeyDictionary()


def _fused_update(momentum: bool, nesterov: bool, decay: bool):
    """The XLA-compiled update of one weight for this combination of options (traced per weight)."""
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def update(var, accum, grad, lr, momentum_rate, weight_decay):
        w = var.read_value()
        if decay:
            w = w - w * weight_decay * lr
        if momentum:
            m = accum.read_value() * momentum_rate - grad * lr
            accum.assign(m)
            w = w + (m * momentum_rate - grad * lr if nesterov else m)
        else:
            w = w - grad * lr
        var.assign(w)

    return update


@keras.saving.register_keras_serializable(package="keras_oneimage")
class FusedSGD(keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with the same arguments and results; one fused update per weight on TensorFlow."""

    @staticmethod
    def _resource(variable):
        """The plain ``tf.Variable`` under ``variable`` if the fused update may take it, else None."""
        if keras.backend.backend() != "tensorflow":
            return None
        import tensorflow as tf

        var = variable.value if isinstance(variable, keras.Variable) else variable
        if not isinstance(var, tf.Variable) or isinstance(var, tf.distribute.DistributedValues):
            return None
        if hasattr(var, "_distributed_container"):  # a replica's component of a mirrored variable
            return None
        return var if var.dtype.name in _FUSED_DTYPES else None

    def _decays(self, variable) -> bool:
        return self.weight_decay is not None and self._use_weight_decay(variable)

    def _apply_weight_decay(self, variables):
        """Keras's decay for the weights the fused update cannot take; the others decay inside `update_step`."""
        if self.weight_decay is None:
            return
        super()._apply_weight_decay([v for v in variables if self._resource(v) is None])

    def update_step(self, gradient, variable, learning_rate):
        """The fused update (decay included) when it applies, else Keras's decay and ``update_step``."""
        import tensorflow as tf

        var = self._resource(variable)
        if var is None:  # Keras's `_apply_weight_decay` has decayed it already
            return super().update_step(gradient, variable, learning_rate)
        accum = None
        if self.momentum != 0:
            accum = self._resource(self.momentums[self._get_variable_index(variable)])
        dense = isinstance(gradient, tf.Tensor) and not isinstance(gradient, tf.IndexedSlices)
        if not dense or (self.momentum != 0 and (accum is None or accum.dtype != var.dtype)):
            if self._decays(variable):  # deferred by `_apply_weight_decay`: Keras's decay, then its update
                lr = tf.cast(self.learning_rate, var.dtype)
                wd = tf.cast(self.weight_decay, var.dtype)
                var.assign_sub(var * wd * lr)
            return super().update_step(gradient, variable, learning_rate)
        key = (self.momentum != 0, bool(self.nesterov), self._decays(variable))
        updates = _UPDATES.setdefault(self, {})
        update = updates.get(key) or updates.setdefault(key, _fused_update(*key))
        dtype = var.dtype
        update(var, accum if accum is not None else var, tf.cast(gradient, dtype), tf.cast(learning_rate, dtype),
               tf.constant(self.momentum, dtype), tf.constant(self.weight_decay or 0.0, dtype))
