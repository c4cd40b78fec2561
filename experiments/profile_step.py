"""Where a training step's time goes: a per-op breakdown of one method's step from the TensorFlow profiler.

Issue #15 ("Profile first"). The method is built the way ``keras_oneimage.fit`` builds it
(``trainer.prepare_run`` → ``trainer.build_method``, its own dataset or the seeded ``patch_dataset``, compiled and
built as ``training.run_training`` does), warmed up (tracing, oneDNN primitive caches), then ``--steps`` steps of
the compiled ``train_function`` run under ``tf.profiler.experimental.start/stop``, each step followed by the
per-batch callback work ``fit`` does (``NonFiniteGuard``). The resulting ``*.xplane.pb`` (an ``XSpace``,
``tensorflow.tsl.profiler.protobuf.xplane_pb2``) is read back and every op event is put in one category:

  conv fwd / conv bwd input / conv bwd filter   Conv2D, Conv2DBackpropInput, Conv2DBackpropFilter (oneDNN's
                                                ``_MklNative*`` kernels; a Conv2DTranspose's forward pass is a
                                                Conv2DBackpropInput op and is counted there)
  batchnorm (fused)                             FusedBatchNorm* forward and gradient kernels
  batchnorm (unfused)                           other ops under a BatchNorm layer's name scope (moving averages)
  pooling                                       MaxPool / AvgPool and their gradients
  dense/matmul                                  MatMul, fused MatMul, BiasAdd(Grad), Einsum: the MLP heads
  optimizer update                              every op under an optimizer's name scope (``sgd/``, ``adam/``)
  casts                                         Cast outside the optimizer (float32 <-> bfloat16)
  activations                                   ReLU / LeakyReLU / sigmoid and their gradients
  rotations/concat/transpose                    ReverseV2, Transpose, ConcatV2 (RotNet's ``rotate_batch``)
  input pipeline                                the step's iterator ops, and all work on tf.data threads
  other                                         everything else (loss, metrics, variable reads, ...)

Op times are each op event's duration on its thread (an op that runs another function's ops counts only its
own part). TensorFlow runs independent ops of a step at once (inter-op parallelism) and tf.data renders the
next batch in the background, so **the summed op time can exceed the wall time**. What the step spends
outside every op is wall time minus the union of the op intervals on the step's executor threads (and the
iterator thread the step waits on): executor scheduling, function-call and Python overhead; the part of it
outside the ``train_function`` call (fit's per-batch callback work, the loop) is printed on its own.
The profiler itself adds a little to every op, so profiled wall times are slightly above unprofiled ones.

Usage:

    .venv/bin/python experiments/profile_step.py [--method rotnet|deepcluster|bigan|jigsaw] [--size 64]
        [--batch 64] [--precision auto|float32|mixed_bfloat16] [--steps 3] [--warmup 2]
        [--pipeline | --no-pipeline] [--head 4096,4096] [--image PATH] [--logdir DIR] [--json out.json] [--quick]

Results and their reading: docs/performance.md ("Where the time goes (2026-12-02, per-op profile ...)").
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_train import DEFAULT_IMAGE, PAPER_WIDTHS, TINY_WIDTHS  # noqa: E402

#: Categories in the order the table prints them.
CATEGORIES = (
    "conv fwd", "conv bwd input", "conv bwd filter", "batchnorm (fused)", "batchnorm (unfused)", "pooling",
    "dense/matmul", "optimizer update", "casts", "activations", "rotations/concat/transpose", "input pipeline",
    "other",
)
#: The name of the per-step trace annotation this script puts on the Python thread.
STEP_EVENT = "profile_step"
#: Ops of the step that hand over the next batch (Keras iterates with ``get_next_as_optional``).
ITERATOR_OPS = frozenset({"IteratorGetNext", "IteratorGetNextAsOptional", "IteratorGetNextSync", "OptionalGetValue",
                          "OptionalHasValue", "OptionalFromValue", "AnonymousIteratorV3", "MakeIterator"})
ACTIVATION_OPS = frozenset({"Relu", "ReluGrad", "Relu6", "Relu6Grad", "LeakyRelu", "LeakyReluGrad", "Sigmoid",
                            "SigmoidGrad", "Tanh", "TanhGrad", "Elu", "EluGrad", "Selu", "SeluGrad", "Softplus"})
LAYOUT_OPS = frozenset({"ReverseV2", "Transpose", "ConjugateTranspose", "ConcatV2", "Concat"})
#: An op event on a thread is named ``<node name>:<op type>``; node names hold no spaces (markers such as
#: ``end: fusion`` or ``EagerLocalExecute: f`` do).
OP_EVENT = re.compile(r"^([^\s:]+):([A-Za-z0-9_]+)$")
#: A BatchNorm layer's name-scope segment: ``bn``, ``conv1_bn``, ``fc1_bn_1``, ``batch_normalization``.
BN_SCOPE = re.compile(r"(^|_)(bn|batch_normalization|batchnorm)(_\d+)?$")


# ------------------------------------------------------------------------------------------------ building
def quick_options(method: str) -> dict:
    """Method options that keep a ``--quick`` run to seconds (tiny heads, pools and GAN widths)."""
    return {
        "rotnet": {"head_widths": (32, 32)},
        "deepcluster": {"head_widths": (32, 32), "pool_size": 128, "num_clusters": 8, "pca_dim": 8},
        "bigan": {"generator_width": 8, "discriminator_width": 8, "latent_dim": 16},
        "jigsaw": {},
    }.get(method, {})


class MethodStep:
    """One method model, built, compiled and fed as ``fit`` does; ``step(i)`` runs one ``train_function`` call
    plus the per-batch callback work of ``fit``, and returns the seconds spent inside the ``train_function`` call."""

    def __init__(self, method: str, *, size: int, batch: int, precision: str, widths, method_options: dict,
                 image, pipeline: bool, seed: int = 0):
        import keras
        import tensorflow as tf

        from keras_oneimage import trainer
        from keras_oneimage.training import NonFiniteGuard, _ensure_built

        self.run = trainer.prepare_run(image, method, image_size=size, batch_size=batch, epochs=1,
                                       steps_per_epoch=1000, seed=seed, widths=widths,
                                       method_options=method_options, precision=precision)
        keras.utils.set_random_seed(seed)
        model = trainer.build_method(self.run)
        context = self.run.context(None)
        own_dataset = getattr(model, "make_dataset", None) is not None
        if pipeline or own_dataset:  # a method with its own dataset (DeepCluster's pool positions) always uses it
            dataset = trainer.patch_stream(model, self.run, context, None)
        else:
            fixed = tf.random.stateless_uniform((batch, size, size, 3), seed=(seed, 1))
            dataset = tf.data.Dataset.from_tensors(fixed).repeat()
        self.pipeline = "method's own dataset" if own_dataset else ("patch_dataset" if pipeline else "fixed batch")
        # as run_training: compile with the method's optimizer, build every weight and the optimizer's slots
        model.compile(optimizer=model.default_optimizer())
        _ensure_built(model, dataset)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.make_train_function()
        self.model = model
        self.iterator = iter(dataset)
        self.callbacks = keras.callbacks.CallbackList([NonFiniteGuard()], model=model, epochs=1, steps=1000)
        self.callbacks.on_train_begin()
        self.logs = None

    def optimizer_scopes(self) -> set[str]:
        """The name scopes of the model's optimizers (their ``name``: ``sgd``, ``adam``, ``adam_1``, ...)."""
        optimizers = [getattr(self.model, "optimizer", None), getattr(self.model, "d_optimizer", None)]
        names = set()
        for opt in optimizers:
            inner = getattr(opt, "inner_optimizer", opt)
            for o in (opt, inner):
                if o is not None and getattr(o, "name", None):
                    names.add(o.name)
        return names

    def step(self, index: int) -> float:
        self.callbacks.on_train_batch_begin(index)
        start = time.perf_counter()
        self.logs = self.model.train_function(self.iterator)
        inside = time.perf_counter() - start
        self.callbacks.on_train_batch_end(index, self.logs)  # converts the logs to numbers: waits for the step
        return inside

    def loss(self) -> float:
        key = "loss" if "loss" in self.logs else sorted(k for k in self.logs if k.endswith("loss"))[0]
        return float(self.logs[key])


# ------------------------------------------------------------------------------------------------ reading
def kernel_type(op_type: str) -> str:
    """``_MklNativeConv2DBackpropFilter`` → ``Conv2DBackpropFilter``: oneDNN's kernels under the TF op name."""
    return re.sub(r"^_(MklNative|Mkl)", "", op_type).lstrip("_")


def categorize(node: str, op_type: str, optimizer_scopes: set[str]) -> str:
    """The category (one of ``CATEGORIES``) of one op event of the step."""
    kind = kernel_type(op_type)
    segments = node.split("/")
    if kind in ITERATOR_OPS:
        return "input pipeline"
    if any(seg in optimizer_scopes for seg in segments):
        return "optimizer update"
    if "BackpropFilter" in kind:
        return "conv bwd filter"
    if "BackpropInput" in kind:
        return "conv bwd input"
    if kind.startswith(("Conv2D", "Conv3D", "FusedConv2D", "DepthwiseConv2dNative", "PadWithConv2D",
                        "PadWithFusedConv2D")):
        return "conv fwd"
    if "FusedBatchNorm" in kind:
        return "batchnorm (fused)"
    if "Pool" in kind:
        return "pooling"
    if "MatMul" in kind or kind in ("BiasAdd", "BiasAddGrad", "BiasAddV1", "Einsum"):
        return "dense/matmul"
    if kind == "Cast":
        return "casts"
    if kind in ACTIVATION_OPS:
        return "activations"
    if kind in LAYOUT_OPS:
        return "rotations/concat/transpose"
    if any(BN_SCOPE.search(seg) for seg in segments[:-1]):
        return "batchnorm (unfused)"
    return "other"


def load_xspace(logdir: str):
    """The ``XSpace`` the profiler wrote under ``logdir`` (``plugins/profile/<run>/<host>.xplane.pb``)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not paths:
        raise SystemExit(f"the profiler wrote no .xplane.pb under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    return space


def _union_length(intervals) -> int:
    """Total length covered by ``[(start, end), ...]`` (picoseconds)."""
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _clip(intervals, windows):
    """``intervals`` cut to the parts inside any of ``windows`` (both lists of (start, end))."""
    out = []
    for start, end in intervals:
        for w_start, w_end in windows:
            s, e = max(start, w_start), min(end, w_end)
            if s < e:
                out.append((s, e))
    return out


def _self_times(events):
    """Each op event of one thread: its duration minus the op events nested inside it (a function-call op)."""
    result = []
    stack: list[list] = []  # [end, index into result]
    for start, end, node, op_type in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            result[stack[-1][1]][2] -= end - start
        result.append([node, op_type, end - start])
        stack.append([end, len(result) - 1])
    return result


def _top_op_category(node: str, kind: str, optimizer_scopes: set[str]) -> str:
    """The category of one row of the top-ops list (the tf.data threads' row is not an op event)."""
    return "input pipeline" if kind == "input pipeline" else categorize(node, kind, optimizer_scopes)


def breakdown(space, optimizer_scopes: set[str], steps: int, top_ops: int = 20) -> dict:
    """Per-category op time, wall time and time outside every op, per step, from a host ``XSpace``."""
    host = next((p for p in space.planes if p.name == "/host:CPU"), None)
    if host is None:
        raise SystemExit("the profile has no /host:CPU plane")
    windows, step_ops, union_ops = [], [], []
    totals: dict[str, int] = defaultdict(int)
    per_op: dict[tuple[str, str], int] = defaultdict(int)
    pipeline_ps = 0
    for line in host.lines:
        base = line.timestamp_ns * 1000
        timed = [(base + e.offset_ps, base + e.offset_ps + e.duration_ps, host.event_metadata[e.metadata_id].name)
                 for e in line.events]
        if line.name == "python":
            windows += [(s, e) for s, e, name in timed if name == STEP_EVENT]
            continue
        if line.name.startswith("tf_data"):
            # tf.data's threads: whatever they run (map functions, the XLA renderer, prefetch) is input pipeline.
            busy = [(s, e) for s, e, name in timed if e > s]
            length = _union_length(busy)
            pipeline_ps += length
            per_op[("(tf.data threads)", "input pipeline")] += length
            if "get_next" in line.name:  # the step waits for this thread's hand-over
                union_ops += busy
            continue
        ops = []
        for s, e, name in timed:
            match = OP_EVENT.match(name)
            if match:
                ops.append((s, e, match.group(1), match.group(2)))
        # nesting only means something within one thread: ops on other threads overlap in time, not in calls
        step_ops += _self_times(ops)
        union_ops += [(s, e) for s, e, _, _ in ops]
    for node, op_type, self_ps in step_ops:
        totals[categorize(node, op_type, optimizer_scopes)] += self_ps
        short = re.sub(r"^(StatefulPartitionedCall/)+", "", node)
        per_op[(short, kernel_type(op_type))] += self_ps
    totals["input pipeline"] += pipeline_ps
    if len(windows) != steps:
        raise SystemExit(f"expected {steps} traced steps, found {len(windows)} {STEP_EVENT!r} events")
    wall_ps = sum(e - s for s, e in windows)
    in_ops_ps = _union_length(_clip(union_ops, windows))
    ms = 1e-9 / steps  # picoseconds summed over the steps -> milliseconds per step
    categories = {c: totals.get(c, 0) * ms for c in CATEGORIES}
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:top_ops]
    return {
        "steps_traced": len(windows),
        "wall_ms": wall_ps * ms,
        "categories_ms": categories,
        "op_total_ms": sum(categories.values()),
        "op_union_ms": in_ops_ps * ms,
        "not_in_any_op_ms": (wall_ps - in_ops_ps) * ms,
        "top_ops_ms": [{"op": f"{node}:{kind}", "ms": t * ms, "category": _top_op_category(node, kind, optimizer_scopes)}
                       for (node, kind), t in top],
    }


# ------------------------------------------------------------------------------------------------ main
def print_table(result: dict) -> None:
    cats, total = result["categories_ms"], result["op_total_ms"]
    print(f"\n{'category':<28} {'ms/step':>9} {'share':>7}")
    for name in CATEGORIES:
        print(f"{name:<28} {cats[name]:>9.1f} {cats[name] / total if total else 0:>7.1%}")
    print(f"{'sum of op times':<28} {total:>9.1f} {1:>7.0%}")
    print(f"\nwall time per step (profiled)          {result['wall_ms']:9.1f} ms")
    print(f"  covered by ops on the step's threads {result['op_union_ms']:9.1f} ms")
    print(f"  time not in any op                   {result['not_in_any_op_ms']:9.1f} ms "
          f"({result['not_in_any_op_ms'] / result['wall_ms']:.1%})")
    print(f"    of it outside train_function       {result['outside_train_function_ms']:9.1f} ms "
          "(fit's per-batch callback work, the loop)")
    print("Summed op time can exceed the wall time: independent ops run at once (inter-op parallelism) and tf.data "
          "renders the next batch in the background.")
    print("\ntop ops (ms/step):")
    for row in result["top_ops_ms"]:
        print(f"  {row['ms']:8.1f}  {row.get('category', ''):<26} {row['op'][:100]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rotnet", choices=("rotnet", "deepcluster", "bigan", "jigsaw"))
    parser.add_argument("--size", type=int, default=64, help="patch size in px (128+: the ImageNet stem)")
    parser.add_argument("--batch", type=int, default=64, help="patches per step")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "mixed_bfloat16"))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="feed the real patch stream (default) or one fixed random batch")
    parser.add_argument("--head", default="4096,4096",
                        help="RotNet head widths (the issue's benchmark: 4096,4096; empty: the method's default)")
    parser.add_argument("--pool-size", type=int, default=1024,
                        help="DeepCluster's pool (the step gathers from it; its size does not change the step)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE) if DEFAULT_IMAGE.exists() else None,
                        help="source image (default: Image A if present, else fit's default photograph)")
    parser.add_argument("--top", type=int, default=12, help="how many of the slowest ops to list")
    parser.add_argument("--logdir", default=None, help="keep the profile here (TensorBoard's profile plugin)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--quick", action="store_true", help="tiny widths, 32 px, batch 2, 2 steps: seconds")
    args = parser.parse_args(argv)

    widths = PAPER_WIDTHS
    options: dict = {}
    if args.method == "rotnet" and args.head:
        options["head_widths"] = tuple(int(w) for w in args.head.split(","))
    if args.method == "deepcluster":
        options["pool_size"] = args.pool_size
    if args.quick:
        # Jigsaw cuts a patch into 3x3 tiles, and the smallest AlexNet takes 16 px tiles
        args.size = 64 if args.method == "jigsaw" else 32
        args.batch, args.steps, args.warmup = 2, 2, 1
        widths = TINY_WIDTHS
        options.update(quick_options(args.method))

    import tensorflow as tf

    from keras_oneimage.errors import InputError

    load_before = os.getloadavg()
    build_start = time.perf_counter()
    try:
        runner = MethodStep(args.method, size=args.size, batch=args.batch, precision=args.precision, widths=widths,
                            method_options=options, image=args.image, pipeline=args.pipeline)
    except InputError as exc:  # a size the method's trunk cannot take, bad options: fit's own message
        raise SystemExit(str(exc)) from None
    for i in range(args.warmup):
        runner.step(i)
    runner.loss()
    warm_s = time.perf_counter() - build_start
    print(f"{args.method}, {args.size} px ({runner.run.variant} stem), batch {args.batch}, {runner.run.precision}, "
          f"widths {widths}, options {options}, {runner.pipeline}; TensorFlow {tf.__version__}, {os.cpu_count()} "
          f"CPUs, threads intra/inter {tf.config.threading.get_intra_op_parallelism_threads()}/"
          f"{tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF's choice); build + {args.warmup} "
          f"warm-up steps {warm_s:.1f}s; load average {load_before[0]:.2f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="profile_step_") as scratch:
        logdir = args.logdir or scratch  # without --logdir the trace is read and deleted
        inside_s, outside_s = 0.0, 0.0
        tf.profiler.experimental.start(logdir)
        try:
            for i in range(args.steps):
                start = time.perf_counter()
                with tf.profiler.experimental.Trace(STEP_EVENT, step_num=i, _r=1):
                    inside = runner.step(args.warmup + i)
                inside_s += inside
                outside_s += time.perf_counter() - start - inside
        finally:
            tf.profiler.experimental.stop()
        loss = runner.loss()
        if loss != loss:
            raise SystemExit("the loss became NaN")
        result = breakdown(load_xspace(logdir), runner.optimizer_scopes(), args.steps, args.top)
    result["outside_train_function_ms"] = 1e3 * outside_s / args.steps
    result.update(method=args.method, size=args.size, batch=args.batch, precision=runner.run.precision,
                  variant=runner.run.variant, widths=list(widths), options={k: list(v) if isinstance(v, tuple) else v
                                                                           for k, v in options.items()},
                  pipeline=runner.pipeline, steps=args.steps, warmup=args.warmup,
                  load_average=[load_before[0], os.getloadavg()[0]], logdir=logdir if args.logdir else None)
    print_table(result)
    print(f"\nload average before / after: {load_before[0]:.2f} / {result['load_average'][1]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
