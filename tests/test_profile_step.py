"""experiments/profile_step.py: a quick RotNet profile is read back from the profiler's XSpace into categories.

Nothing about timings is asserted: only that the trace was found and parsed (every profiled step, the conv
kernels present) and that the categories partition the op time.
"""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

profile_step = pytest.importorskip("profile_step")


def test_quick_rotnet_profile_partitions_the_op_time(tmp_path, photo_path):
    out = tmp_path / "profile.json"
    # --no-pipeline skips compiling the XLA patch renderer, which only costs the test time
    result = profile_step.main(["--quick", "--no-pipeline", "--precision", "float32", "--image", str(photo_path),
                                "--json", str(out)])
    assert json.loads(out.read_text())["categories_ms"] == pytest.approx(result["categories_ms"])
    assert result["steps_traced"] == result["steps"] == 2
    cats = result["categories_ms"]
    assert list(cats) == list(profile_step.CATEGORIES)
    assert sum(cats.values()) == pytest.approx(result["op_total_ms"])
    for name in ("conv fwd", "conv bwd input", "conv bwd filter", "optimizer update", "rotations/concat/transpose"):
        assert cats[name] > 0, name
    assert all(v >= 0 for v in cats.values())
    # the ops cover part of each step; what they leave is the time not in any op
    assert 0 < result["op_union_ms"] <= result["wall_ms"]
    assert result["not_in_any_op_ms"] == pytest.approx(result["wall_ms"] - result["op_union_ms"])


@pytest.mark.parametrize("node, op_type, category", [
    ("StatefulPartitionedCall/rotnet_1/alexnet_1/conv1_1/conv_1/convolution", "_MklNativeConv2D", "conv fwd"),
    ("gradient_tape/rotnet_1/alexnet_1/conv3_1/conv_1/convolution/Conv2DBackpropFilter",
     "_MklNativeConv2DBackpropFilter", "conv bwd filter"),
    ("gradient_tape/a/conv2/convolution/Conv2DBackpropInput", "_MklNativeConv2DBackpropInput", "conv bwd input"),
    ("rotnet_1/alexnet_1/conv1_1/bn_1/FusedBatchNormV3", "_MklNativeFusedBatchNormEx", "batchnorm (fused)"),
    ("rotnet_1/head_1/fc1_bn_1/mul_2", "Mul", "batchnorm (unfused)"),
    ("rotnet_1/alexnet_1/pool1_1/MaxPool2d", "_MklNativeMaxPool", "pooling"),
    ("rotnet_1/head_1/fc1_1/MatMul", "_MklMatMul", "dense/matmul"),
    ("StatefulPartitionedCall/sgd/Cast_114", "Cast", "optimizer update"),
    ("StatefulPartitionedCall/sgd/AssignAddVariableOp_22", "AssignAddVariableOp", "optimizer update"),
    ("rotnet_1/alexnet_1/conv5_1/conv_1/convolution/Cast", "Cast", "casts"),
    ("gradient_tape/rotnet_1/alexnet_1/conv1_1/ReluGrad", "ReluGrad", "activations"),
    ("rot90/cond/then/_79/rot90/cond/ReverseV2", "ReverseV2", "rotations/concat/transpose"),
    ("optional", "OptionalFromValue", "input pipeline"),
    ("SparseSoftmaxCrossEntropyWithLogits/SparseSoftmaxCrossEntropyWithLogits",
     "SparseSoftmaxCrossEntropyWithLogits", "other"),
])
def test_categories_of_op_events_seen_in_a_bf16_rotnet_trace(node, op_type, category):
    assert profile_step.categorize(node, op_type, {"sgd"}) == category


def test_self_times_subtract_nested_ops_and_union_merges_overlaps():
    # a function-call op [0, 10) running two ops inside it, then an op on its own
    events = [(0, 10, "call", "PartitionedCall"), (1, 3, "a", "Mul"), (4, 8, "b", "Mul"), (12, 15, "c", "Cast")]
    assert [t for _, _, t in profile_step._self_times(events)] == [4, 2, 4, 3]
    assert profile_step._union_length([(0, 5), (3, 8), (10, 12)]) == 10
    assert profile_step._clip([(0, 10)], [(2, 4), (6, 7)]) == [(2, 4), (6, 7)]
