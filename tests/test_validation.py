"""keras_oneimage.validation: the shared checks of user-supplied values."""
import pytest

from keras_oneimage import validation
from keras_oneimage.errors import InputError


@pytest.mark.parametrize(
    "value, expected",
    [("conv2", ("conv2",)), (["conv3", "conv1"], ("conv3", "conv1")), (("conv1",), ("conv1",))],
)
def test_layer_names_accepts_known_taps_in_the_order_given(value, expected):
    assert validation.layer_names(value, ("conv1", "conv2", "conv3")) == expected


@pytest.mark.parametrize(
    "value, message",
    [("conv9", "unknown layer"), ((), "at least one"), (("conv1", "conv1"), "duplicates"), (3, "sequence")],
)
def test_layer_names_refuses_unknown_empty_repeated_and_non_sequences(value, message):
    with pytest.raises(InputError, match=message):
        validation.layer_names(value, ("conv1", "conv2"), label="freeze")


def test_layer_names_may_allow_no_layer_but_still_checks_the_ones_given():
    assert validation.layer_names((), ("conv1",), allow_empty=True) == ()
    with pytest.raises(InputError, match="unknown layer"):
        validation.layer_names(("conv1", "fc6"), ("conv1",), allow_empty=True)


@pytest.mark.parametrize("value, minimum", [(0, 0), (4, 4), (7, 0)])
def test_int_at_least_accepts_integers_from_the_bound(value, minimum):
    import numpy as np

    assert validation.int_at_least("n", value, minimum) == value
    assert validation.int_at_least("n", np.int64(value), minimum) == value


@pytest.mark.parametrize("value, minimum", [(-1, 0), (3, 4), (True, 0), (1.0, 0), ("2", 0), (None, 0)])
def test_int_at_least_refuses_smaller_and_non_integers(value, minimum):
    with pytest.raises(InputError, match=f"shard_index must be an integer >= {minimum}"):
        validation.int_at_least("shard_index", value, minimum)
