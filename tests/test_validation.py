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
    [("conv9", "unknown layer"), ((), "unknown layer"), (("conv1", "conv1"), "duplicates"), (3, "sequence")],
)
def test_layer_names_refuses_unknown_empty_repeated_and_non_sequences(value, message):
    with pytest.raises(InputError, match=message):
        validation.layer_names(value, ("conv1", "conv2"), label="freeze")
