"""Scale-out with ``tf.distribute``: strategy names, the sharded patch pipeline, chief-only output, lr scaling.

``fit(..., strategy=...)`` accepts ``None`` (TensorFlow's default strategy: one device), a
``tf.distribute.Strategy``, or one of the names of :func:`resolve_strategy`. Everything a run creates (backbone,
method, optimizer, compile, DeepCluster's pool) is created inside ``strategy.scope()``; ``batch_size`` is the
**global** batch, split evenly over ``strategy.num_replicas_in_sync`` replicas.

Data: :func:`distribute_patches` builds one patch stream per input pipeline (one per worker) with
``strategy.distribute_datasets_from_function``; pipeline ``i`` renders ``patch_dataset(seed, num_shards=n,
shard_index=i)`` at the per-replica batch size, so every worker draws its own patches (nothing is rendered and
thrown away), and the replicas of one worker get successive, different batches of that worker's stream. No two
replicas train on the same patches.

Output: on a multi-worker run only the chief (``strategy.extended.should_checkpoint``) writes into ``output_dir``;
the other workers do the same work (saving can involve collective reads) into :func:`write_dir`, a per-worker
``.workertemp_<task_id>`` folder that :func:`~keras_oneimage.training.run_training` deletes at the end — the
pattern Keras documents for ``ModelCheckpoint`` / ``BackupAndRestore`` under ``MultiWorkerMirroredStrategy``.
Every worker restores from the chief's ``output_dir/backup``, so ``output_dir`` must be on storage all workers
see (NFS, a mounted bucket); a worker that cannot see the chief's backup is detected and stops with an error.

See ``docs/distributed.md`` for commands (several GPUs, several hosts, TPU) and the learning-rate rule.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from keras_oneimage.errors import InputError

#: Names `resolve_strategy` understands ("tpu:NAME" selects a TPU by name or gRPC address).
STRATEGY_NAMES = ("mirrored", "multiworker", "tpu")
#: Learning-rate scaling rules of `learning_rate_factor`.
LR_SCALING = ("none", "linear", "sqrt")
#: The batch a base learning rate refers to under "linear"/"sqrt" scaling (Goyal et al. 2017: lr = 0.1 · B/256).
REFERENCE_BATCH = 256
#: Name of a non-chief worker's scratch folder inside ``output_dir`` (``.workertemp_<task_id>``).
WORKER_TEMP_PREFIX = ".workertemp_"


# ------------------------------------------------------------------------------------------------- strategies
def tf_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable (``None`` if unset); `InputError` if it is malformed."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"TF_CONFIG is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    return config


def _check_tf_config() -> dict:
    config = tf_config()
    if config is None:
        raise InputError(
            "strategy 'multiworker' needs TF_CONFIG (the cluster and this worker's task); see docs/distributed.md"
        )
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster or not isinstance(task, dict):
        raise InputError("TF_CONFIG must hold a non-empty 'cluster' object and a 'task' object")
    task_type, task_index = task.get("type"), task.get("index")
    members = cluster.get(task_type)
    if not isinstance(members, list) or isinstance(task_index, bool) or not isinstance(task_index, int) \
            or not 0 <= task_index < len(members):
        raise InputError(
            f"TF_CONFIG task {task_type!r}/{task_index!r} is not in its cluster {sorted(cluster)}"
        )
    return config


#: One strategy per name and device set for the whole process. A second MirroredStrategy over the same devices
#: restarts TensorFlow's collective instance keys and clashes with the first one's collectives ("Shape mismatch
#: in the collective instance 100", tensorflow/tensorflow#62790); TensorFlow allows one MultiWorkerMirroredStrategy.
_strategies: dict[tuple, tf.distribute.Strategy] = {}


def _mirrored() -> tf.distribute.Strategy:
    """MirroredStrategy over every GPU; without GPUs over every logical CPU device (1 unless configured)."""
    devices = tuple(d.name for d in tf.config.list_logical_devices("GPU")) or tuple(
        d.name for d in tf.config.list_logical_devices("CPU"))
    key = ("mirrored", devices)
    if key not in _strategies:
        _strategies[key] = tf.distribute.MirroredStrategy(list(devices) or None)
    return _strategies[key]


def _multiworker() -> tf.distribute.Strategy:
    """The process's MultiWorkerMirroredStrategy for ``TF_CONFIG`` (created once: TensorFlow allows one)."""
    config = _check_tf_config()
    key = ("multiworker", json.dumps(config, sort_keys=True))
    if key not in _strategies:
        try:
            _strategies[key] = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:
            if "program startup" not in str(exc):
                raise
            raise InputError(
                "strategy 'multiworker' must be created before TensorFlow runs anything: call "
                "keras_oneimage.distribute.resolve_strategy('multiworker') first thing in the program and pass "
                "the strategy to fit"
            ) from None
    return _strategies[key]


def _tpu(name: str | None) -> tf.distribute.Strategy:
    tpu = name or os.environ.get("TPU_NAME") or "local"
    key = ("tpu", tpu)
    if key in _strategies:  # initialising the TPU system again would wipe the TPU's memory
        return _strategies[key]
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.NotFoundError) as exc:
        raise InputError(f"cannot connect to TPU {tpu!r}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    _strategies[key] = tf.distribute.TPUStrategy(resolver)
    return _strategies[key]


def resolve_strategy(strategy: Any) -> tf.distribute.Strategy | None:
    """``None`` → ``None`` (no strategy); a ``tf.distribute.Strategy`` → itself; a name → that strategy.

    A name gives the same strategy object every time in a process (created on first use): TensorFlow supports
    one MultiWorkerMirroredStrategy per process, a second MirroredStrategy over the same devices clashes with the
    first one's collectives (tensorflow/tensorflow#62790), and re-initialising a TPU wipes its memory.

    Names:
      ``"mirrored"``: ``MirroredStrategy`` over all visible GPUs (without GPUs: over the logical CPU devices).
      ``"multiworker"``: ``MultiWorkerMirroredStrategy`` with the cluster from ``TF_CONFIG`` (required). Create
        it at program start, before TensorFlow runs anything else (TensorFlow requires this of collective ops).
      ``"tpu"`` / ``"tpu:NAME"``: ``TPUClusterResolver(tpu=NAME)`` (default ``$TPU_NAME``, else ``"local"`` for
        a TPU VM), connect, initialise the TPU system, ``TPUStrategy``.
    """
    if strategy is None or isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if not isinstance(strategy, str):
        raise InputError(
            f"strategy must be None, a tf.distribute.Strategy or one of {', '.join(STRATEGY_NAMES)}; "
            f"got {strategy!r}"
        )
    name = strategy.strip().lower()
    if name == "mirrored":
        return _mirrored()
    if name in ("multiworker", "multi_worker", "multi-worker"):
        return _multiworker()
    if name == "tpu" or name.startswith("tpu:"):
        return _tpu(strategy.strip()[4:] or None)
    raise InputError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_NAMES)} (or pass a Strategy)")


def current_strategy(strategy: tf.distribute.Strategy | None = None) -> tf.distribute.Strategy:
    """``strategy``, else the one in scope (TensorFlow's default strategy outside any scope)."""
    return strategy if strategy is not None else tf.distribute.get_strategy()


def num_replicas(strategy: tf.distribute.Strategy | None = None) -> int:
    return int(current_strategy(strategy).num_replicas_in_sync)


def is_multi_worker(strategy: tf.distribute.Strategy | None = None) -> bool:
    """True for a ``MultiWorkerMirroredStrategy`` over more than one worker."""
    extended = current_strategy(strategy).extended
    check = getattr(extended, "_in_multi_worker_mode", None)
    return bool(check()) if callable(check) else False


def task_id(strategy: tf.distribute.Strategy | None = None) -> int:
    """This worker's task index (0 outside a multi-worker cluster)."""
    resolver = getattr(current_strategy(strategy), "cluster_resolver", None)
    index = getattr(resolver, "task_id", None)
    return int(index) if index is not None else 0


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes the run's files: always, except on non-chief workers of a multi-worker run.

    The chief is task ``chief`` (or ``worker`` 0 when the cluster has no ``chief`` job).
    """
    return bool(getattr(current_strategy(strategy).extended, "should_checkpoint", True))


def write_dir(output_dir: str | os.PathLike | None, strategy: tf.distribute.Strategy | None = None) -> str | None:
    """Where this worker writes: ``output_dir`` on the chief, ``output_dir/.workertemp_<task_id>`` elsewhere."""
    if output_dir is None:
        return None
    output_dir = os.fspath(output_dir)
    if is_chief(strategy):
        return output_dir
    return os.path.join(output_dir, f"{WORKER_TEMP_PREFIX}{task_id(strategy)}")


def _gather_rows(values: Sequence[float], strategy: tf.distribute.Strategy) -> np.ndarray:
    """``(replicas, len(values))``: every replica's copy of its worker's ``values`` (a collective)."""
    row = tf.constant([[float(v) for v in values]], tf.float64)

    @tf.function
    def gather():
        return strategy.gather(strategy.run(lambda: tf.identity(row)), axis=0)

    return gather().numpy()


def workers_agree(values: float | Sequence[float], strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether every worker passed exactly the same ``values`` (a collective: all workers must call it together).

    True without multi-worker.
    """
    strategy = current_strategy(strategy)
    if not is_multi_worker(strategy):
        return True
    rows = _gather_rows(np.atleast_1d(values).tolist(), strategy)
    return bool(np.all(rows == rows[:1]))


def any_worker(flag: bool, strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether ``flag`` is true on any worker (a collective on a multi-worker run; ``flag`` itself otherwise)."""
    strategy = current_strategy(strategy)
    if not is_multi_worker(strategy):
        return bool(flag)
    return bool(_gather_rows([1.0 if flag else 0.0], strategy).max() > 0)


# ------------------------------------------------------------------------------------------------- data
def per_replica_batch_size(global_batch: int, strategy: tf.distribute.Strategy | None = None) -> int:
    """``global_batch / replicas``; `InputError` unless it divides evenly (uneven splits bias the mean loss)."""
    replicas = num_replicas(strategy)
    if global_batch % replicas:
        raise InputError(
            f"batch_size {global_batch} (the global batch) must be a multiple of the {replicas} replicas "
            f"in sync; try {max(replicas, global_batch - global_batch % replicas)}"
        )
    return global_batch // replicas


def patch_dataset_fn(images, *, image_size: int, batch_size: int, augment=None, seed: int = 0, start_step: int = 0
                     ) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
    """The ``dataset_fn`` for ``strategy.distribute_datasets_from_function``: one seeded shard per pipeline.

    ``batch_size`` is the global batch; each pipeline batches ``input_context.get_per_replica_batch_size``.
    """
    from keras_oneimage.data.synthetic import patch_dataset

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        return patch_dataset(
            images,
            image_size=image_size,
            batch_size=input_context.get_per_replica_batch_size(batch_size),
            augment=augment,
            seed=seed,
            num_shards=input_context.num_input_pipelines,
            shard_index=input_context.input_pipeline_id,
            start_step=start_step,
        )

    return dataset_fn


def distribute_patches(images, *, image_size: int, batch_size: int, augment=None, seed: int = 0,
                       strategy: tf.distribute.Strategy | None = None, start_step: int = 0):
    """The patch stream of `fit` under ``strategy``: a distributed dataset ``model.fit`` accepts as is.

    ``batch_size`` is the global batch (a multiple of the replica count). Pipeline ``i`` of ``n`` (one per
    worker) is ``patch_dataset(images, seed=seed, num_shards=n, shard_index=i)`` at the per-replica batch.
    """
    strategy = current_strategy(strategy)
    per_replica_batch_size(batch_size, strategy)
    return strategy.distribute_datasets_from_function(
        patch_dataset_fn(images, image_size=image_size, batch_size=batch_size, augment=augment, seed=seed,
                         start_step=start_step)
    )


# ------------------------------------------------------------------------------------------------- replica state
def _local_statistics(model) -> list:
    """The model's non-trainable float variables (BatchNorm moving mean/variance, spectral-norm vectors …)."""
    return [v for v in model.non_trainable_variables if str(v.dtype).startswith(("float", "bfloat"))]


class SyncReplicaStatistics:
    """Averages the replicas' copies of a model's non-trainable statistics (a collective over all workers).

    Gradients are all-reduced, so trainable weights stay identical on every replica; but BatchNorm's moving
    statistics are updated by each replica from its own batch (Keras creates them with ``aggregation="none"``),
    so the copies drift apart: a saved model, a probe or DeepCluster's eval-mode features would see one replica's
    statistics, and on a multi-worker run every worker would hold (and save) different ones. Calling this sets
    every copy to their mean — over all data of the step(s) since the last call.
    """

    def __init__(self, model, strategy: tf.distribute.Strategy | None = None):
        self.strategy = current_strategy(strategy)
        self.variables = _local_statistics(model)
        self._fn = None

    def __call__(self) -> None:
        if self.strategy.num_replicas_in_sync < 2 or not self.variables:
            return
        if self._fn is None:
            strategy, variables = self.strategy, self.variables

            @tf.function
            def sync():
                def local():  # in replica context a variable reads as this replica's copy
                    return tf.concat([tf.reshape(tf.cast(v.value, tf.float32), [-1]) for v in variables], 0)

                mean = strategy.reduce("MEAN", strategy.run(local), axis=None)
                offset = 0
                for v in variables:
                    size = int(np.prod(v.shape))
                    v.assign(tf.cast(tf.reshape(mean[offset:offset + size], v.shape), v.dtype))
                    offset += size

            self._fn = sync
        self._fn()


# ------------------------------------------------------------------------------------------------- optimizers
def learning_rate_factor(global_batch: int, scaling: str = "none", reference_batch: int = REFERENCE_BATCH) -> float:
    """Multiplier of the base learning rate for ``global_batch`` patches.

    ``"none"``: 1 (the default: the rate you give is the rate used, whatever the replica count);
    ``"linear"``: ``global_batch / reference_batch`` (Goyal et al. 2017); ``"sqrt"``: its square root (a common
    rule for Adam). The base rate (given, or the method's default) is read as the rate for ``reference_batch``.
    """
    if scaling not in LR_SCALING:
        raise InputError(f"lr_scaling must be one of {', '.join(LR_SCALING)}, got {scaling!r}")
    if isinstance(reference_batch, bool) or not isinstance(reference_batch, int) or reference_batch < 1:
        raise InputError(f"reference_batch must be a positive integer, got {reference_batch!r}")
    ratio = global_batch / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def method_optimizers(model) -> list:
    """Every optimizer of a compiled method model (the main one, plus BiGAN's discriminator optimizer and, when its
    encoder has its own rate, the encoder's)."""
    found = []
    for name in ("optimizer", "d_optimizer", "e_optimizer"):
        opt = getattr(model, name, None)
        if opt is not None and all(opt is not other for other in found):
            found.append(opt)
    return found


def scale_learning_rates(model, factor: float) -> list[float]:
    """Multiply the learning rate of every optimizer of ``model`` by ``factor``; return the new rates."""
    def current(opt) -> float:  # float(variable) fails on a MirroredVariable; numpy conversion does not
        return float(np.asarray(opt.learning_rate))

    rates = []
    for opt in method_optimizers(model):
        inner = getattr(opt, "inner_optimizer", opt)  # LossScaleOptimizer
        if factor != 1.0:
            try:
                inner.learning_rate = current(inner) * factor
            except TypeError:
                raise InputError(
                    "lr_scaling cannot rescale a LearningRateSchedule; scale the schedule yourself and use "
                    "lr_scaling='none'"
                ) from None
        rates.append(current(inner))
    return rates


def optimizer_in_scope(optimizer: Any, strategy: tf.distribute.Strategy | None):
    """An optimizer (or BiGAN's ``{"d", "eg"}`` dict) whose variables belong to ``strategy``.

    Keras optimizers create their iteration counter and learning-rate variables on construction, so one made
    outside ``strategy.scope()`` is re-created from its config inside it (a built one is refused).
    """
    import keras

    if optimizer is None or strategy is None:
        return optimizer
    if isinstance(optimizer, dict) and set(optimizer) <= {"d", "eg"}:
        return {key: optimizer_in_scope(value, strategy) for key, value in optimizer.items()}
    if not isinstance(optimizer, keras.optimizers.Optimizer):  # a name or a config dict
        with strategy.scope():
            return keras.optimizers.get(optimizer)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "_distribution_strategy", None) is strategy:
        return optimizer
    if getattr(optimizer, "built", False):
        raise InputError("pass an optimizer that has not been used yet (or create it inside strategy.scope())")
    with strategy.scope():
        return optimizer.__class__.from_config(optimizer.get_config())
