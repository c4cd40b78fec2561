"""Training speed: our Keras RotNet step vs the same AlexNet RotNet step in PyTorch eager, in one process.

Both sides train the same network on the same work: a batch of ``B`` patches is rotated by 0/90/180/270° into
``4B`` images (``rotate_batch``), the AlexNet-BN trunk (our variant for that input size: "cifar" below 128 px,
"imagenet" from 128 px, exactly as ``keras_oneimage.fit`` picks it) and the RotNet head (flatten →
[Dense → BN → ReLU] x widths → Dense 4) run forward and backward, and SGD with momentum 0.9 (weight decay 5e-4)
updates the weights. The script checks that the trainable parameter counts are equal and prints both.

Rates count **rotated images** (4 per patch, ``4B`` per step) per second. Each variant is warmed up (tracing,
XLA compilation, oneDNN primitive caches), then timed windows of a few steps alternate between the variants
(round robin, so a change in machine load hits every variant alike); a rate is the median over windows. Two
ratios are printed per variant: the ratio of the medians, and the median of the per-round ratios (each window
against the reference's window of the same round), which is the more robust one on a shared machine. The
reference ("peer best") is the fastest PyTorch variant that ran (highest median rate); by default the PyTorch
variants include its best CPU setting, bf16 autocast + channels_last, eager and under ``torch.compile``.

Peak memory is the peak RSS (``VmHWM``) of a separate child process per variant that imports only that
framework and runs the warm-up and a few steps (tracemalloc does not see TensorFlow's allocator).

Variant names (``--variants``, comma-separated):

  keras-<fp32|bf16>[-xla|-noxla][-spe<N>][-pipe]   our RotNet step, run as ``fit`` runs it (``train_function``)
      fp32 / bf16    ``float32`` or ``mixed_bfloat16`` Keras policy (bf16 matmuls/convs, float32 weights)
      -xla / -noxla  ``compile(jit_compile=...)``; neither: Keras's default ("auto": off on CPU-only machines)
      -spe<N>        ``compile(steps_per_execution=N)``; absent: Keras's default (1)
      -pipe          feed the real augmented patch stream (``patch_dataset`` over ``--image``, prefetching in
                     the background) instead of one fixed random batch
      -kbn           stock ``keras.layers.BatchNormalization`` instead of our ``FusedBatchNormalization``
                     (the lever's before/after)
      -fusedsgd      ``keras_oneimage.optimizers.FusedSGD`` with the method's SGD arguments instead of Keras's SGD
                     (the lever's before/after)
      -tfgrad        stock ``keras.layers.Conv2D`` (TensorFlow's ``Conv2DBackpropFilter`` everywhere) instead of our
                     ``SmallMapConv2D`` (matmul filter gradients on conv3-conv5's small maps; the lever's before/after)
      -stockstem     stock ``keras.layers.Conv2D`` for the strided conv1 instead of our ``SpaceToDepthConv2D``
                     (the ImageNet stem on space-to-depth blocks; the lever's before/after)
  torch[-bf16][-cl][-compile]                       the PyTorch step on one fixed random batch
      -bf16          ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward pass
      -cl            ``channels_last`` memory format
      -compile       ``torch.compile`` of the whole step (forward, loss, backward, SGD); where it fails on this
                     machine the variant is reported as failed and skipped

Without PyTorch installed the ``torch`` variants are skipped (ratios are then printed against the first
variant). ``--accuracy`` instead trains RotNets with and without a lever (``--accuracy-arms``: float32 against
mixed_bfloat16 by default, ``bf16,bf16-tfgrad`` for the filter-gradient lever, ``bf16,bf16-stockstem`` for the
space-to-depth stem) on the same seed and compares their
loss curves and linear-probe accuracy on a CIFAR-10 subset. Results and the levers they decided:
docs/performance.md. Usage:

    .venv/bin/python experiments/bench_train.py [--sizes 32,64,224] [--batch 64] [--windows 5] [--steps 3]
        [--variants keras-bf16,keras-bf16-fusedsgd,torch-bf16-cl,torch-bf16-cl-compile] [--threads INTRA,INTER] [--torch-threads N]
        [--no-memory] [--json out.json] [--quick]
    .venv/bin/python experiments/bench_train.py --accuracy [--sizes 64] [--batch 32] [--accuracy-steps 240]
        [--accuracy-arms random,fp32,bf16] [--accuracy-epochs 4]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "images" / "image_a.jpg"
NUM_ROTATIONS = 4
PAPER_WIDTHS = (96, 256, 384, 384, 256)
TINY_WIDTHS = (8, 16, 24, 24, 16)
DEFAULT_VARIANTS = "keras-fp32,keras-bf16,keras-bf16-pipe,torch,torch-bf16-cl,torch-bf16-cl-compile"
QUICK_VARIANTS = "keras-fp32,keras-bf16-pipe,torch"


# ------------------------------------------------------------------------------------------------ variants
def parse_variant(name: str) -> dict:
    """``"keras-bf16-xla-spe4-pipe"`` → ``{"framework": "keras", "precision": "bf16", "jit": True, ...}``."""
    tokens = name.split("-")
    framework = tokens[0]
    if framework not in ("keras", "torch"):
        raise ValueError(f"variant {name!r}: must start with 'keras' or 'torch'")
    spec = {"name": name, "framework": framework, "precision": "fp32", "jit": None, "spe": None, "pipe": False,
            "channels_last": False, "keras_bn": False, "fused_sgd": False, "tf_grad": False, "stock_stem": False,
            "compile": False}
    for tok in tokens[1:]:
        if tok in ("fp32", "bf16"):
            spec["precision"] = tok
        elif tok in ("xla", "noxla") and framework == "keras":
            spec["jit"] = tok == "xla"
        elif tok.startswith("spe") and tok[3:].isdigit() and framework == "keras":
            spec["spe"] = int(tok[3:])
        elif tok == "pipe" and framework == "keras":
            spec["pipe"] = True
        elif tok == "kbn" and framework == "keras":
            spec["keras_bn"] = True
        elif tok == "fusedsgd" and framework == "keras":
            spec["fused_sgd"] = True
        elif tok == "tfgrad" and framework == "keras":
            spec["tf_grad"] = True
        elif tok == "stockstem" and framework == "keras":
            spec["stock_stem"] = True
        elif tok == "cl" and framework == "torch":
            spec["channels_last"] = True
        elif tok == "compile" and framework == "torch":
            spec["compile"] = True
        else:
            raise ValueError(f"variant {name!r}: unknown option {tok!r}")
    return spec


def alexnet_variant(size: int) -> str:
    """The AlexNet variant ``keras_oneimage.fit`` uses at this patch size."""
    return "imagenet" if size >= 128 else "cifar"


# ------------------------------------------------------------------------------------------------ ours (Keras)
@contextlib.contextmanager
def _replaced(modules, name: str, stock, enabled: bool):
    """Build with ``stock`` in place of our layer class ``name`` in each of ``modules`` (a lever's before)."""
    if not enabled:
        yield
        return
    saved = [getattr(module, name) for module in modules]
    for module in modules:
        setattr(module, name, stock)
    try:
        yield
    finally:
        for module, ours in zip(modules, saved):
            setattr(module, name, ours)


def _stock_batchnorm(enabled: bool):
    """``keras.layers.BatchNormalization`` in place of ``FusedBatchNormalization``."""
    import keras

    from keras_oneimage.methods import rotnet
    from keras_oneimage.models import alexnet

    return _replaced((alexnet, rotnet), "FusedBatchNormalization", keras.layers.BatchNormalization, enabled)


def _stock_conv(enabled: bool):
    """``keras.layers.Conv2D`` in place of ``SmallMapConv2D``."""
    import keras

    from keras_oneimage.models import alexnet

    return _replaced((alexnet,), "SmallMapConv2D", keras.layers.Conv2D, enabled)


def _stock_stem(enabled: bool):
    """``keras.layers.Conv2D`` in place of ``SpaceToDepthConv2D``."""
    import keras

    from keras_oneimage.models import alexnet

    return _replaced((alexnet,), "SpaceToDepthConv2D", keras.layers.Conv2D, enabled)


class KerasStep:
    """Our RotNet, compiled as ``fit`` compiles it; ``run(n)`` does ``n`` training steps through ``train_function``."""

    def __init__(self, spec: dict, size: int, batch: int, widths, head, image: Path, seed: int = 0):
        import keras
        import tensorflow as tf

        from keras_oneimage.precision import precision_scope
        from keras_oneimage.methods.rotnet import RotNet
        from keras_oneimage.models import AlexNet

        self.spec = spec
        self.size = size
        self.batch = batch
        keras.utils.set_random_seed(seed)
        # as keras_oneimage.fit builds it: inside a precision scope, which the models record in their config
        with precision_scope("mixed_bfloat16" if spec["precision"] == "bf16" else "float32"):
            with _stock_batchnorm(spec["keras_bn"]), _stock_conv(spec["tf_grad"]), _stock_stem(spec["stock_stem"]):
                model = RotNet(AlexNet(alexnet_variant(size), size, widths=widths), head_widths=head)
        compile_kw = {}
        if spec["jit"] is not None:
            compile_kw["jit_compile"] = spec["jit"]
        if spec["spe"] is not None:
            compile_kw["steps_per_execution"] = spec["spe"]
        optimizer = model.default_optimizer()
        if spec["fused_sgd"]:  # the fused-update lever: FusedSGD with the method's SGD arguments
            from keras_oneimage.optimizers import FusedSGD

            optimizer = FusedSGD.from_config(optimizer.get_config())
        self.optimizer_name = type(optimizer).__name__
        model.compile(optimizer=optimizer, **compile_kw)
        model(tf.zeros((1, size, size, 3)), training=False)  # build every weight
        self.model = model
        self.steps_per_call = int(model.steps_per_execution)
        self.jit = bool(model.jit_compile)
        if spec["pipe"]:
            from keras_oneimage.data.images import load_image
            from keras_oneimage.data.synthetic import patch_dataset

            dataset = patch_dataset([load_image(image)], image_size=size, batch_size=batch, seed=seed)
        else:
            fixed = tf.random.stateless_uniform((batch, size, size, 3), seed=(seed, 1))
            dataset = tf.data.Dataset.from_tensors(fixed).repeat()
        self.iterator = iter(dataset)
        model.make_train_function()
        self.logs = None

    @property
    def params(self) -> int:
        return int(sum(math.prod(v.shape) for v in self.model.trainable_variables))

    def describe(self) -> str:
        policy = "mixed_bfloat16" if self.spec["precision"] == "bf16" else "float32"
        data = "patch_dataset" if self.spec["pipe"] else "fixed batch"
        bn = "stock Keras BN" if self.spec["keras_bn"] else "fused BN"
        conv = "TF filter grads" if self.spec["tf_grad"] else "matmul filter grads on small maps"
        return (f"{policy}, jit_compile={self.jit}, steps_per_execution={self.steps_per_call}, {bn}, {conv}, "
                f"{self.optimizer_name}, {data}")

    def round_steps(self, steps: int) -> int:
        return max(1, -(-steps // self.steps_per_call)) * self.steps_per_call

    def run(self, steps: int) -> float:
        for _ in range(self.round_steps(steps) // self.steps_per_call):
            self.logs = self.model.train_function(self.iterator)
        return float(self.logs["loss"])  # waits for the last step


# ------------------------------------------------------------------------------------------------ PyTorch
def torch_alexnet_rotnet(size: int, widths, head):
    """The same network in PyTorch (NCHW): our AlexNet variant at ``size`` and the RotNet head."""
    import torch
    import torch.nn as nn

    def block(cin, cout, kernel, stride, pad):
        return [nn.Conv2d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
                nn.ReLU(inplace=True)]

    if alexnet_variant(size) == "imagenet":  # conv1 11x11/4 pad 2, max-pools 3/2 without padding
        stem, pool = block(3, widths[0], 11, 4, 2), (lambda: nn.MaxPool2d(3, 2))
    else:  # conv1 5x5 with stride size // 32 ("same"), max-pools 3/2 "same"
        stem, pool = block(3, widths[0], 5, max(1, size // 32), 2), (lambda: nn.MaxPool2d(3, 2, 1))
    layers = [*stem, pool(), *block(widths[0], widths[1], 5, 1, 2), pool(),
              *block(widths[1], widths[2], 3, 1, 1), *block(widths[2], widths[3], 3, 1, 1),
              *block(widths[3], widths[4], 3, 1, 1), pool(), nn.Flatten()]
    trunk = nn.Sequential(*layers)
    with torch.no_grad():
        flat = trunk(torch.zeros(2, 3, size, size)).shape[1]
    hidden = []
    for width in head:
        hidden += [nn.Linear(flat, width, bias=False), nn.BatchNorm1d(width, eps=1e-5, momentum=0.1), nn.ReLU(True)]
        flat = width
    return nn.Sequential(trunk, *hidden, nn.Linear(flat, NUM_ROTATIONS))


class TorchStep:
    """The PyTorch RotNet step on one fixed batch: rot90 x4 + cat, forward, cross-entropy, backward, SGD; eager, or
    the whole step under ``torch.compile`` (compilation happens in the first call, i.e. the warm-up)."""

    def __init__(self, spec: dict, size: int, batch: int, widths, head, image: Path | None = None, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        self.torch = torch
        self.spec = spec
        self.size = size
        self.batch = batch
        self.model = torch_alexnet_rotnet(size, widths, head)
        self.memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.model.train()
        # Keras decays weights decoupled, torch adds the decay to the gradient: the same work per step.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.x = torch.rand(batch, 3, size, size)
        self.labels = torch.arange(NUM_ROTATIONS).repeat_interleave(batch)
        self.steps_per_call = 1
        self._step = torch.compile(self.step) if spec["compile"] else self.step

    @property
    def params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters() if p.requires_grad))

    def describe(self) -> str:
        mode = "torch.compile" if self.spec["compile"] else "eager"
        return (f"torch {self.torch.__version__} {mode}, {self.torch.get_num_threads()} threads, "
                f"{'bf16 autocast' if self.spec['precision'] == 'bf16' else 'float32'}, "
                f"{'channels_last' if self.spec['channels_last'] else 'NCHW'}, fixed batch")

    def round_steps(self, steps: int) -> int:
        return steps

    def step(self):
        torch = self.torch
        x = torch.cat([torch.rot90(self.x, k, (2, 3)) for k in range(NUM_ROTATIONS)])
        x = x.contiguous(memory_format=self.memory_format)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.spec["precision"] == "bf16"):
            logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def run(self, steps: int) -> float:
        for _ in range(steps):
            loss = self._step()
        return float(loss.detach())


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def make_step(spec: dict, **kw):
    return (KerasStep if spec["framework"] == "keras" else TorchStep)(spec, **kw)


# ------------------------------------------------------------------------------------------------ measuring
def measure_size(specs: list[dict], *, size: int, batch: int, widths, head, image: Path, warmup: int,
                 windows: int, steps: int) -> dict:
    """Builds every variant, warms it up, then times ``windows`` rounds of ``steps`` steps each, round robin."""
    runners, failed = {}, {}
    for spec in specs:
        start = time.perf_counter()
        try:
            runner = make_step(spec, size=size, batch=batch, widths=widths, head=head, image=image)
            # torch.compile traces the step again once the optimizer's state exists: warm up past that too
            runner.run(runner.round_steps(max(3, warmup) if spec.get("compile") else max(1, warmup)))
        except Exception as exc:  # noqa: BLE001 - only torch.compile may fail here (no compiler, no backend)
            if not spec.get("compile"):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            failed[spec["name"]] = f"{type(exc).__name__}: {first_line}"
            print(f"  {spec['name']:<26} torch.compile FAILED on this machine, skipped: {failed[spec['name']]}",
                  flush=True)
            continue
        runners[spec["name"]] = runner
        print(f"  {spec['name']:<26} {runner.describe()}; built + warm-up {time.perf_counter() - start:.1f}s",
              flush=True)
    params = {name: r.params for name, r in runners.items()}
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for w in range(windows):
        order = names[w % len(names):] + names[: w % len(names)]  # rotate who goes first
        for name in order:
            runner = runners[name]
            n = runner.round_steps(steps)
            start = time.perf_counter()
            loss = runner.run(n)
            elapsed = time.perf_counter() - start
            if loss != loss:
                raise RuntimeError(f"{name}: loss became NaN")
            rates[name].append(NUM_ROTATIONS * batch * n / elapsed)
    del runners
    return {"params": params, "rates": rates, "failed": failed}


def peak_rss_child(spec_name: str, *, size: int, batch: int, widths, head, image: Path, steps: int) -> dict | None:
    """Peak RSS (MiB) of a fresh process that imports one framework, builds the variant and trains ``steps``."""
    cmd = [sys.executable, __file__, "--_memory-child", spec_name, "--sizes", str(size), "--batch", str(batch),
           "--widths", ",".join(map(str, widths)), "--head", ",".join(map(str, head)), "--image", str(image),
           "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY "):
            return json.loads(line[len("MEMORY "):])
    print(f"  memory child for {spec_name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def _peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM`` (per address space, so not inherited from the parent across fork/exec
    as ``ru_maxrss`` is); ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(spec_name: str, *, size: int, batch: int, widths, head, image: Path, steps: int) -> None:
    spec = parse_variant(spec_name)
    import importlib

    importlib.import_module("tensorflow" if spec["framework"] == "keras" else "torch")
    base = _rss_mib()
    runner = make_step(spec, size=size, batch=batch, widths=widths, head=head, image=image)
    runner.run(runner.round_steps(steps))
    peak = _peak_rss_mib()
    print("MEMORY " + json.dumps({"peak_rss_mib": peak, "after_import_mib": base}), flush=True)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def peer_best(specs: list[dict], result: dict) -> str:
    """The reference of the ratios: the fastest PyTorch variant that ran (highest median rate), else the first."""
    rates = result["rates"]
    torch_names = [s["name"] for s in specs if s["framework"] == "torch" and s["name"] in rates]
    if not torch_names:
        return next(s["name"] for s in specs if s["name"] in rates)
    return max(torch_names, key=lambda name: _median(rates[name]))


def report(size: int, batch: int, result: dict, memory: dict, reference: str) -> dict:
    rates, params = result["rates"], result["params"]
    ref = rates[reference]
    summary = {}
    peer = " (peer best: the fastest PyTorch variant)" if reference.startswith("torch") else ""
    print(f"\n{size} px, batch {batch} patches = {NUM_ROTATIONS * batch} rotated images per step "
          f"(rates in rotated images/s, median of {len(ref)} windows; ratios vs {reference}{peer})")
    print(f"  {'variant':<26} {'params':>11} {'images/s':>9} {'min':>7} {'max':>7} {'ratio':>6} {'paired':>6} "
          f"{'peak RSS MiB (after import)':>27}")
    for name, xs in rates.items():
        ratio = _median(xs) / _median(ref)
        paired = _median([a / b for a, b in zip(xs, ref)])
        mem = memory.get(name)
        mem_s = f"{mem['peak_rss_mib']:.0f} ({mem['after_import_mib']:.0f})" if mem else "-"
        print(f"  {name:<26} {params[name]:>11,} {_median(xs):>9.1f} {min(xs):>7.1f} {max(xs):>7.1f} "
              f"{ratio:>6.2f} {paired:>6.2f} {mem_s:>27}")
        summary[name] = {"params": params[name], "images_per_s": _median(xs), "windows": xs, "ratio": ratio,
                         "paired_ratio": paired, "memory": mem, "reference": name == reference}
    for name, why in result.get("failed", {}).items():
        print(f"  {name:<26} failed: {why}")
    counts = set(params.values())
    print(f"  parameter counts {'match' if len(counts) == 1 else 'DIFFER'}: {sorted(counts)}")
    if len(counts) != 1:
        raise SystemExit("parameter counts differ: the two networks are not the same")
    return summary


# ------------------------------------------------------------------------------------------------ accuracy
#: ``--accuracy-arms`` tokens: (precision policy, train at all, stock Conv2D filter gradients, stock strided conv1).
ACCURACY_ARMS = {"random": ("float32", False, False, False), "fp32": ("float32", True, False, False),
                 "bf16": ("mixed_bfloat16", True, False, False), "fp32-tfgrad": ("float32", True, True, False),
                 "bf16-tfgrad": ("mixed_bfloat16", True, True, False),
                 "fp32-stockstem": ("float32", True, False, True),
                 "bf16-stockstem": ("mixed_bfloat16", True, False, True)}


def accuracy_check(*, size: int, batch: int, steps: int, image: Path, per_class: int, probe_epochs: int,
                   seed: int = 0, arms: Sequence[str] = ("random", "fp32", "bf16"), epochs: int = 4) -> dict:
    """Does a lever change what RotNet learns? Trains RotNet as ``fit`` does (default head, SGD) once per arm on
    the same seed and patch stream (``fp32`` / ``bf16``: the precision policy; ``-tfgrad``: stock Conv2D filter
    gradients, the before of the ``SmallMapConv2D`` lever; ``-stockstem``: Conv2D's own strided conv1, the before of
    ``SpaceToDepthConv2D``), prints each epoch's loss, then fits linear probes on
    every tap over a CIFAR-10 subset (``per_class`` train and test images per class); ``random`` is the floor."""
    import keras

    from keras_oneimage.data.images import load_image
    from keras_oneimage.data.labelled import load_labelled
    from keras_oneimage.data.synthetic import patch_dataset
    from keras_oneimage.precision import precision_scope
    from keras_oneimage.methods.rotnet import RotNet
    from keras_oneimage.models import AlexNet
    from keras_oneimage.probes import probe
    from keras_oneimage.training import run_training

    unknown = [a for a in arms if a not in ACCURACY_ARMS]
    if unknown:
        raise SystemExit(f"unknown --accuracy-arms {unknown}; choose from {', '.join(ACCURACY_ARMS)}")
    data = load_labelled("cifar10", max_per_class=per_class, seed=seed)
    source = [load_image(image)]
    rows = {}
    for name in arms:
        policy, train, stock_conv, stock_stem = ACCURACY_ARMS[name]
        keras.utils.set_random_seed(seed)
        with precision_scope(policy), _stock_conv(stock_conv), _stock_stem(stock_stem):
            model = RotNet(AlexNet(alexnet_variant(size), size))
        start = time.perf_counter()
        history = {}
        if train:
            stream = patch_dataset(source, image_size=size, batch_size=batch, seed=seed)
            history = run_training(model, stream, epochs=epochs, steps_per_epoch=max(1, steps // epochs),
                                   verbose=0).history
        train_s = time.perf_counter() - start
        accs = probe(model.backbone, data, epochs=probe_epochs, seed=seed, verbose=0)
        rows[name] = {"probe": accs, "train_s": train_s, "loss": history.get("loss", [None])[-1],
                      "loss_curve": history.get("loss", []),
                      "rotation_accuracy": history.get("rotation_accuracy", [None])[-1]}
        print(f"  {name:<12} train {train_s:6.0f}s  final loss {rows[name]['loss'] or float('nan'):.3f}  "
              f"rotation acc {rows[name]['rotation_accuracy'] or float('nan'):.3f}  probe "
              + " ".join(f"{k} {v:.3f}" for k, v in accs.items()), flush=True)
        if history:
            print("               loss per epoch " + " ".join(f"{v:.4f}" for v in history["loss"]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,224", help="input sizes in px (comma-separated)")
    parser.add_argument("--batch", type=int, default=64, help="patches per step (4x as many rotated images)")
    parser.add_argument("--variants", default=None, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed window")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--widths", default=",".join(map(str, PAPER_WIDTHS)), help="AlexNet conv widths")
    parser.add_argument("--head", default="4096,4096", help="RotNet head widths (the issue's 4096-4096)")
    parser.add_argument("--threads", default=None,
                        help="intra,inter: TensorFlow's thread pools (keras_oneimage.training.configure_threads)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="source image for the -pipe variants")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="tiny network, 32 px, batch 2, 2 windows of 1 step: a smoke test")
    parser.add_argument("--accuracy", action="store_true",
                        help="instead of timing: train float32 and mixed_bfloat16 RotNets for --accuracy-steps at "
                             "the first of --sizes and compare linear-probe accuracy on a CIFAR-10 subset")
    parser.add_argument("--accuracy-steps", type=int, default=400)
    parser.add_argument("--accuracy-epochs", type=int, default=4, help="epochs the steps are split into (loss curve)")
    parser.add_argument("--accuracy-arms", default="random,fp32,bf16",
                        help=f"comma-separated, from {', '.join(ACCURACY_ARMS)}")
    parser.add_argument("--probe-per-class", type=int, default=100)
    parser.add_argument("--probe-epochs", type=int, default=10)
    parser.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.quick:
        args.sizes, args.batch, args.windows, args.steps, args.warmup = "32", 2, 2, 1, 1
        args.widths, args.head = ",".join(map(str, TINY_WIDTHS)), "32,32"
        args.variants = args.variants or QUICK_VARIANTS
    sizes = [int(s) for s in args.sizes.split(",")]
    widths = tuple(int(w) for w in args.widths.split(","))
    head = tuple(int(w) for w in args.head.split(",") if w)
    if args.threads:
        intra, inter = (int(t) for t in args.threads.split(","))
        from keras_oneimage.training import configure_threads

        configure_threads(intra, inter)
    if args.torch_threads and have_torch():
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.memory_child:
        memory_child(args.memory_child, size=sizes[0], batch=args.batch, widths=widths, head=head,
                     image=args.image, steps=args.steps)
        return {}

    if args.accuracy:
        print(f"accuracy check ({args.accuracy_arms}): {sizes[0]} px, batch {args.batch}, {args.accuracy_steps} steps, "
              f"probes on {args.probe_per_class} CIFAR-10 images per class, {args.probe_epochs} epochs", flush=True)
        rows = accuracy_check(size=sizes[0], batch=args.batch, steps=args.accuracy_steps, image=args.image,
                              per_class=args.probe_per_class, probe_epochs=args.probe_epochs,
                              arms=[a.strip() for a in args.accuracy_arms.split(",") if a.strip()],
                              epochs=args.accuracy_epochs)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return rows

    specs = [parse_variant(v) for v in (args.variants or DEFAULT_VARIANTS).split(",")]
    if not have_torch():
        skipped = [s["name"] for s in specs if s["framework"] == "torch"]
        specs = [s for s in specs if s["framework"] != "torch"]
        if skipped:
            print(f"PyTorch is not installed: skipping {', '.join(skipped)} (ratios are against {specs[0]['name']})")
    if not specs:
        raise SystemExit("no variant left to run")

    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs visible, threads intra/inter "
          f"{tf.config.threading.get_intra_op_parallelism_threads()}/"
          f"{tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF's choice); "
          f"batch {args.batch} patches, {args.windows} windows x {args.steps} steps after {args.warmup} warm-up")
    results = {}
    for size in sizes:
        print(f"\n== {size} px ({alexnet_variant(size)} AlexNet, widths {widths}, head {head})", flush=True)
        result = measure_size(specs, size=size, batch=args.batch, widths=widths, head=head, image=args.image,
                              warmup=args.warmup, windows=args.windows, steps=args.steps)
        reference = peer_best(specs, result)
        memory = {}
        if not args.no_memory:
            for spec in specs:
                if spec["name"] not in result["rates"]:
                    continue
                memory[spec["name"]] = peak_rss_child(spec["name"], size=size, batch=args.batch, widths=widths,
                                                      head=head, image=args.image, steps=args.warmup + 1)
        results[size] = report(size, args.batch, result, memory, reference)
    print()
    for size, summary in results.items():
        reference = next(name for name, s in summary.items() if s["reference"])
        line = ", ".join(f"{name} {s['paired_ratio']:.2f}" for name, s in summary.items() if name != reference)
        print(f"RATIO {size}px vs {reference} (paired median): {line}")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return results


if __name__ == "__main__":
    main()
