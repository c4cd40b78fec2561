"""experiments/bench_train.py: the quick mode runs end to end and prints its ratios (nothing about timings)."""
import json
import os
import pathlib
import runpy
import statistics
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench_train.py"


def _run(args, tmp_path, *, block_torch=False, prelude=""):
    """Runs the script in a fresh process (it sets global Keras policies and thread pools)."""
    code = "import runpy, sys\n" + prelude
    if block_torch:  # as if torch were not installed: `import torch` raises ModuleNotFoundError
        code += (
            "class _NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ModuleNotFoundError(\"No module named 'torch'\", name=name)\n"
            "sys.meta_path.insert(0, _NoTorch())\n"
        )
    code += f"sys.argv = {[str(SCRIPT), *args]!r}\nrunpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quick_mode_completes_and_prints_ratios(tmp_path, photo_path):
    out = tmp_path / "bench.json"
    stdout = _run(["--quick", "--image", str(photo_path), "--json", str(out)], tmp_path)
    assert "parameter counts match" in stdout
    assert "RATIO 32px" in stdout
    results = json.loads(out.read_text())["32"]
    assert {"keras-fp32", "keras-bf16-pipe"} <= set(results)
    for name, row in results.items():
        assert row["images_per_s"] > 0 and len(row["windows"]) == 2, name
        assert row["memory"] is None or row["memory"]["peak_rss_mib"] > 0, name
    assert len({row["params"] for row in results.values()}) == 1  # the same network on both sides
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "PyTorch is not installed" in stdout and "torch" not in results
        reference = "keras-fp32"  # the first variant, without PyTorch
    else:
        assert "torch" in results
        reference = "torch"
    assert f"RATIO 32px vs {reference}" in stdout
    # Every ratio is the variant's rate over the reference's, read from the windows the run recorded.
    ref = results[reference]
    for name, row in results.items():
        assert row["ratio"] == pytest.approx(row["images_per_s"] / ref["images_per_s"]), name
        paired = statistics.median(a / b for a, b in zip(row["windows"], ref["windows"]))
        assert row["paired_ratio"] == pytest.approx(paired), name


def test_without_torch_it_skips_the_pytorch_side(tmp_path):
    stdout = _run(["--quick", "--variants", "keras-fp32,keras-bf16,torch", "--no-memory"], tmp_path, block_torch=True)
    assert "PyTorch is not installed: skipping torch" in stdout
    assert "RATIO 32px vs keras-fp32 (paired median): keras-bf16" in stdout


def test_variant_tokens_and_peer_best():
    script = runpy.run_path(str(SCRIPT), run_name="bench_train_module")  # defines, does not run main
    parse, peer_best = script["parse_variant"], script["peer_best"]
    assert parse("keras-bf16-fusedsgd")["fused_sgd"] and not parse("keras-bf16")["fused_sgd"]
    assert parse("torch-bf16-cl-compile")["compile"] and parse("torch-bf16-cl-compile")["channels_last"]
    assert parse("keras-bf16-tfgrad")["tf_grad"] and not parse("keras-bf16")["tf_grad"]
    for bad in ("keras-bf16-compile", "torch-fusedsgd", "torch-tfgrad"):
        with pytest.raises(ValueError):
            parse(bad)
    assert "torch-bf16-cl" in script["DEFAULT_VARIANTS"].split(",")
    specs = [parse(n) for n in ("keras-bf16", "torch", "torch-bf16-cl", "torch-bf16-cl-compile")]
    # the fastest torch variant that ran (a failed torch.compile has no rates), whatever our own rates are
    rates = {"keras-bf16": [9.0, 9.0], "torch": [1.0, 2.0], "torch-bf16-cl": [3.0, 2.5]}
    assert peer_best(specs, {"rates": rates}) == "torch-bf16-cl"
    assert peer_best(specs[:1], {"rates": {"keras-bf16": [1.0]}}) == "keras-bf16"


def test_tfgrad_builds_the_lever_before():
    """``-tfgrad`` builds the trunk with stock Conv2D layers, ``-stockstem`` its strided conv1; the defaults are
    SmallMapConv2D and SpaceToDepthConv2D; the swaps are undone."""
    import keras

    from keras_oneimage.models import AlexNet, conv

    script = runpy.run_path(str(SCRIPT), run_name="bench_train_module")

    def conv_types():
        trunk = AlexNet("cifar", 32, widths=(4, 4, 4, 4, 4))
        return {type(layer) for layer in trunk._flatten_layers() if isinstance(layer, keras.layers.Conv2D)}

    with script["_stock_conv"](True):
        assert conv_types() == {keras.layers.Conv2D}
    assert conv_types() == {conv.SmallMapConv2D}

    def stem_type():
        trunk = AlexNet("imagenet", 128, widths=(4, 4, 4, 4, 4))
        return type(trunk.get_layer("conv1").conv)

    with script["_stock_stem"](True):
        assert stem_type() is keras.layers.Conv2D
    assert stem_type() is conv.SpaceToDepthConv2D
    assert script["parse_variant"]("keras-bf16-stockstem")["stock_stem"]
    with pytest.raises(SystemExit, match="unknown --accuracy-arms"):
        script["accuracy_check"](size=32, batch=2, steps=1, image=pathlib.Path("x"), per_class=1, probe_epochs=1,
                                 arms=["bf16", "int8"])


def test_a_failing_torch_compile_is_reported_and_skipped(tmp_path):
    pytest.importorskip("torch")
    prelude = ("import torch\n"
               "def _broken(fn):\n"
               "    def call(*a, **k):\n"
               "        raise RuntimeError('no C++ compiler on this machine')\n"
               "    return call\n"
               "torch.compile = _broken\n")
    stdout = _run(["--quick", "--variants", "keras-fp32,torch,torch-compile", "--no-memory"], tmp_path,
                  prelude=prelude)
    assert "torch-compile" in stdout and "torch.compile FAILED" in stdout and "no C++ compiler" in stdout
    assert "RATIO 32px vs torch (paired median): keras-fp32" in stdout
