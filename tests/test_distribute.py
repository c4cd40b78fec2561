"""tf.distribute scale-out: strategy names, lr scaling, the sharded patch pipeline, and real multi-replica runs.

The multi-replica tests run in subprocesses: 2 logical CPU devices must be configured before TensorFlow
initialises, and a MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
"""
import json
import os
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_oneimage import distribute
from keras_oneimage.errors import InputError
from keras_oneimage.methods.bigan import BiGAN
from keras_oneimage.methods.rotnet import RotNet
from keras_oneimage.models import AlexNet

TINY = (8, 8, 8, 8, 8)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": "tensorflow"}
ENV.pop("TF_CONFIG", None)

# Makes every trunk built by keras_oneimage.fit tiny (fit does not expose the widths): the training core builds
# trunks through the registry only.
_TINY_FIT = """
import keras_oneimage.models.registry as _registry
_build = _registry.build_trunk
def _tiny_build(name=None, **kwargs):
    return _build(name, **{**kwargs, "widths": (8, 8, 8, 8, 8)})
_registry.build_trunk = _tiny_build
"""


def _run(script, *args, timeout=300, env=ENV):
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


# ------------------------------------------------------------------------------------------------- in process
def test_resolve_strategy_names_and_errors(monkeypatch):
    assert distribute.resolve_strategy(None) is None
    default = tf.distribute.get_strategy()
    assert distribute.resolve_strategy(default) is default
    with pytest.raises(InputError, match="unknown strategy 'horovod'"):
        distribute.resolve_strategy("horovod")
    with pytest.raises(InputError, match="must be None, a tf.distribute.Strategy"):
        distribute.resolve_strategy(2)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(InputError, match="needs TF_CONFIG"):
        distribute.resolve_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        distribute.resolve_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                "task": {"type": "worker", "index": 1}}))
    with pytest.raises(InputError, match="not in its cluster"):
        distribute.resolve_strategy("multiworker")


def test_single_process_defaults_are_chief_and_write_in_place(tmp_path):
    assert distribute.is_chief() and not distribute.is_multi_worker()
    assert distribute.write_dir(tmp_path) == str(tmp_path)
    assert distribute.write_dir(None) is None
    assert distribute.per_replica_batch_size(6) == 6
    assert distribute.workers_agree([1.0, 2.0])


def test_learning_rate_factor():
    assert distribute.learning_rate_factor(64) == 1.0
    assert distribute.learning_rate_factor(512, "linear") == 2.0
    assert distribute.learning_rate_factor(64, "linear", reference_batch=64) == 1.0
    assert distribute.learning_rate_factor(1024, "sqrt") == pytest.approx(2.0)
    with pytest.raises(InputError, match="lr_scaling"):
        distribute.learning_rate_factor(64, "cubic")
    with pytest.raises(InputError, match="reference_batch"):
        distribute.learning_rate_factor(64, "linear", reference_batch=0)


def test_scale_learning_rates_covers_both_bigan_players_and_refuses_schedules():
    bigan = BiGAN(AlexNet("cifar", 32, widths=TINY), latent_dim=4, generator_width=4, discriminator_width=4,
                  d_learning_rate=1e-3, eg_learning_rate=2e-3, e_learning_rate=5e-4)
    bigan.compile()
    assert distribute.scale_learning_rates(bigan, 4.0) == pytest.approx([8e-3, 4e-3, 2e-3])  # G, D, E
    assert float(bigan.d_optimizer.learning_rate) == pytest.approx(4e-3)

    rotnet = RotNet(AlexNet("cifar", 32, widths=TINY), head_widths=(8,))
    rotnet.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)))
    assert distribute.scale_learning_rates(rotnet, 1.0) == pytest.approx([0.1])
    with pytest.raises(InputError, match="LearningRateSchedule"):
        distribute.scale_learning_rates(rotnet, 2.0)


def test_fit_applies_lr_scaling_and_rejects_bad_strategy_before_writing(tmp_path, monkeypatch):
    import keras_oneimage
    from keras_oneimage import training

    captured = {}

    def fake_run_training(model, dataset, **kwargs):  # no training: only the compiled optimizer matters here
        captured["model"] = model

    monkeypatch.setattr(training, "run_training", fake_run_training)
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    keras_oneimage.fit(image, "rotnet", image_size=32, batch_size=128, epochs=1, steps_per_epoch=1,
                       lr_scaling="linear", optimizer=keras.optimizers.SGD(0.4), head_widths=(8,), verbose=0)
    assert float(captured["model"].optimizer.learning_rate) == pytest.approx(0.4 * 128 / 256)

    out = tmp_path / "never"
    with pytest.raises(InputError, match="unknown strategy"):
        keras_oneimage.fit(image, image_size=32, strategy="gpus", output_dir=out)
    with pytest.raises(InputError, match="lr_scaling"):
        keras_oneimage.fit(image, image_size=32, lr_scaling="quadratic", output_dir=out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- 2 replicas
_MIRRORED_SCRIPT = r"""
import math, pathlib, sys
import numpy as np, tensorflow as tf, keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""" + _TINY_FIT + r"""
import keras_oneimage
from keras_oneimage import distribute
from keras_oneimage.data.labelled import from_arrays
from keras_oneimage.data.synthetic import patch_dataset
from keras_oneimage.errors import InputError
from keras_oneimage.methods.rotnet import RotNet
from keras_oneimage.models import AlexNet
from keras_oneimage.probes import probe
from keras_oneimage.training import run_training

out, image = pathlib.Path(sys.argv[1]), sys.argv[2]
strategy = distribute.resolve_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2, strategy.extended.worker_devices
assert distribute.resolve_strategy("mirrored") is strategy  # one per process (tensorflow#62790)

# 1. Same loss curve as one device with the same global batch. Step k's global batch is [x_k; x_k], so each
#    replica's half equals x_k and per-replica BatchNorm statistics match the single device's.
xs = [tf.random.stateless_uniform((4, 32, 32, 3), seed=(k, 1)) for k in range(4)]
fixed = tf.data.Dataset.from_tensor_slices(tf.stack([tf.concat([x, x], 0) for x in xs])).repeat()

def curve(strat):
    with strat.scope():
        keras.utils.set_random_seed(0)
        model = RotNet(AlexNet("cifar", 32, widths=(8, 8, 8, 8, 8)), head_widths=(8,))
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=5e-4))
    history = run_training(model, fixed, epochs=4, steps_per_epoch=1, verbose=0)
    return model, np.array(history.history["loss"])

single, single_curve = curve(tf.distribute.get_strategy())
multi, multi_curve = curve(strategy)
assert multi.distribute_strategy is strategy
assert single_curve[-1] != single_curve[0]
np.testing.assert_allclose(multi_curve, single_curve, rtol=1e-4)
# The all-reduce sums the replicas' gradients in another order than one device's batch mean; after 4 momentum steps
# that float32 rounding reaches ~3e-4 in conv1's kernel on an AVX2 CPU (2026-12-01), while a wrong gradient
# scale or an unsynced replica moves weights by a whole update (lr 0.05 x gradient), far above 1e-3.
for a, b in zip(single.weights, multi.weights):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-3, err_msg=a.path)
print("curve", single_curve.round(5).tolist(), multi_curve.round(5).tolist())

# 2. The patch stream: per-replica batches, and no two replicas get the same patches.
dist = distribute.distribute_patches(image, image_size=32, batch_size=8, seed=3, strategy=strategy)
seen = []
for _, batch in zip(range(2), dist):
    parts = [p.numpy() for p in strategy.experimental_local_results(batch)]
    assert [p.shape for p in parts] == [(4, 32, 32, 3)] * 2
    seen += parts
for i in range(len(seen)):
    for j in range(i):
        assert not np.allclose(seen[i], seen[j]), (i, j)
try:
    distribute.distribute_patches(image, image_size=32, batch_size=7, strategy=strategy)
    raise AssertionError("an odd global batch was accepted")
except InputError as exc:
    assert "multiple of the 2 replicas" in str(exc), exc

# 3. DeepCluster (per-epoch feature extraction + k-means, then training on pseudo-labels) through fit.
dc = keras_oneimage.fit(image, "deepcluster", image_size=32, batch_size=8, epochs=2, steps_per_epoch=1,
                        strategy="mirrored", output_dir=out / "dc", verbose=0, num_clusters=4, pool_size=64,
                        pca_dim=8, kmeans_iterations=3, feature_batch_size=32)
assert dc.distribute_strategy is strategy
rows = (out / "dc" / "history.csv").read_text().splitlines()
assert len(rows) == 3, rows
logs = dc.history.history
assert logs["clusters"][-1] >= 2 and 0.0 <= logs["nmi"][-1] <= 1.0, logs
# Epoch 1 is one step of a fresh head (N(0, 0.01^2) weights): its loss is near log(k), not log(k) / replicas.
assert abs(logs["loss"][0] - math.log(4)) < 0.2, logs["loss"]
assert (out / "dc" / "model.keras").is_file()

# 4. BiGAN's two-player step through fit, with optimizers made outside the scope (fit re-creates them inside it)
#    and linear lr scaling (8 / reference 4 = x2) applied to both players.
players = {"d": keras.optimizers.Adam(1e-4, beta_1=0.5), "eg": keras.optimizers.Adam(2e-4, beta_1=0.5)}
bg = keras_oneimage.fit(image, "bigan", image_size=32, batch_size=8, epochs=1, steps_per_epoch=1,
                        strategy=strategy, output_dir=out / "bg", verbose=0, latent_dim=8, generator_width=8,
                        discriminator_width=8, optimizer=players, lr_scaling="linear", reference_batch=4)
assert bg.d_optimizer.iterations.numpy() == 1 and bg.optimizer.iterations.numpy() == 1
rates = [np.asarray(bg.d_optimizer.learning_rate), np.asarray(bg.optimizer.learning_rate)]
np.testing.assert_allclose(rates, [2e-4, 4e-4], rtol=1e-6)
assert all(math.isfinite(v[-1]) for v in bg.history.history.values()), bg.history.history
assert (out / "bg" / "bigan_samples_epoch1.png").is_file()

# 5. Linear probes under the strategy's scope, on the trunk trained under it.
rng = np.random.default_rng(0)
def draw(n):
    y = np.arange(n) % 3
    x = 0.25 + 0.5 * np.eye(3)[y][:, None, None, :] + rng.normal(0, 0.1, (n, 32, 32, 3))
    return np.clip(x, 0, 1).astype(np.float32), y
data = from_arrays(*draw(48), *draw(24), val_fraction=0.0, seed=0)
with strategy.scope():
    scores = probe(multi.backbone, data, layers=("conv1",), epochs=3, batch_size=16, learning_rate=0.05, verbose=0)
assert all(acc >= 0.9 for acc in scores.values()), scores
print("OK", logs["loss"], scores)
"""


def test_two_replica_mirrored_matches_one_device_and_runs_every_method(tmp_path, photo_path):
    """MirroredStrategy over 2 logical CPUs: RotNet loss curve = one device; DeepCluster, BiGAN, probes run."""
    stdout = _run(_MIRRORED_SCRIPT, tmp_path, photo_path, timeout=420)
    assert "OK" in stdout


# ------------------------------------------------------------------------------------------------- 2 workers
_WORKER_SCRIPT = r"""
import json, os, pathlib, sys
index, ports, out, image = int(sys.argv[1]), sys.argv[2].split(","), pathlib.Path(sys.argv[3]), sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                      "task": {"type": "worker", "index": index}})
from keras_oneimage import distribute
strategy = distribute.resolve_strategy("multiworker")  # first: before TensorFlow runs anything
import numpy as np
""" + _TINY_FIT + r"""
import keras_oneimage
from keras_oneimage.errors import InputError
assert strategy.num_replicas_in_sync == 2 and distribute.is_multi_worker(strategy)
assert distribute.is_chief(strategy) == (index == 0)

# Each worker's input pipeline renders its own shard.
first = next(iter(distribute.distribute_patches(image, image_size=32, batch_size=4, seed=0, strategy=strategy)))
np.save(out / f"patches{index}.npy", strategy.experimental_local_results(first)[0].numpy())

def run(epochs, output_dir):
    model = keras_oneimage.fit(image, "rotnet", image_size=32, batch_size=8, epochs=epochs, steps_per_epoch=2,
                               strategy="multiworker", output_dir=output_dir, verbose=0, head_widths=(8,))
    return model, model.history.epoch

model, epochs = run(1, out / "run")
assert epochs == [0], epochs
np.savez(out / f"weights{index}_1.npz", *model.get_weights())
# Resume from the chief's backup: epoch index 1 only, from the epoch-1 weights.
model, epochs = run(2, out / "run")
assert epochs == [1], epochs
np.savez(out / f"weights{index}_2.npz", *model.get_weights())
assert not (out / "run" / f".workertemp_{index}").exists()
# A worker that cannot see the chief's backup (its own, empty output_dir) is detected on every worker.
try:
    run(3, out / "run" if index == 0 else out / f"elsewhere{index}")
    raise AssertionError("workers restored different states without an error")
except InputError as exc:
    assert "storage all workers share" in str(exc), exc
# A loss that turns NaN at the 2nd step on worker 1 only stops both workers there (none waits for the other).
import tensorflow as tf
from keras_oneimage.methods.rotnet import RotNet, rotation_loss
from keras_oneimage.models import AlexNet
from keras_oneimage.training import NonFiniteLossError, run_training
with strategy.scope():
    model = RotNet(AlexNet("cifar", 32), head_widths=(8,))
    poison = float("nan") if index == 1 else 1.0
    model.loss_fn = lambda y, logits: rotation_loss(y, logits) * tf.where(model.optimizer.iterations >= 1,
                                                                          poison, 1.0)
data = distribute.distribute_patches(image, image_size=32, batch_size=4, strategy=strategy)
try:
    run_training(model, data, epochs=2, steps_per_epoch=3, output_dir=out / "nan", verbose=0)
    raise AssertionError("the NaN loss was not caught")
except NonFiniteLossError as exc:
    assert "epoch 1/2, step 2/3" in str(exc), exc
print("WORKER OK", index)
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_train_identically_and_only_the_chief_writes(tmp_path, photo_path):
    """MultiWorkerMirroredStrategy, 2 worker processes on 127.0.0.1: fit, resume, identical weights, NaN stop."""
    ports = ",".join(map(str, _free_ports(2)))
    logs = [(open(tmp_path / f"worker{i}.out", "w+"), open(tmp_path / f"worker{i}.err", "w+")) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER_SCRIPT, str(i), ports, str(tmp_path), str(photo_path)],
                              env=ENV, stdout=out, stderr=err, text=True) for i, (out, err) in enumerate(logs)]
    deadline = time.monotonic() + 420
    try:
        # A worker that fails leaves the other waiting in a collective: stop everything at the first failure.
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    for proc, (out, err) in zip(procs, logs):
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        out.close(), err.close()
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
        assert "WORKER OK" in stdout

    assert not np.allclose(np.load(tmp_path / "patches0.npy"), np.load(tmp_path / "patches1.npy"))
    for phase in (1, 2):
        w0, w1 = np.load(tmp_path / f"weights0_{phase}.npz"), np.load(tmp_path / f"weights1_{phase}.npz")
        assert len(w0.files) == len(w1.files) > 10
        for key in w0.files:
            np.testing.assert_array_equal(w0[key], w1[key], err_msg=f"phase {phase} {key}")
    first, second = np.load(tmp_path / "weights0_1.npz"), np.load(tmp_path / "weights0_2.npz")
    assert any(not np.array_equal(first[k], second[k]) for k in first.files)  # the resumed epoch trained

    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "backup", "conv1_filters.png", "history.csv", "logs", "model.keras", "run.json"]
    assert [row.split(",")[0] for row in (run / "history.csv").read_text().splitlines()[1:]] == ["0", "1"]
    assert json.loads((run / "backup" / "training_metadata.json").read_text())["epoch"] == 2
