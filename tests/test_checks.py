"""rconv.common.checks: the whole-number check every public function shares (as_whole, whole_number, whole_numbers)."""
import numpy as np
import pytest
import torch

import rconv_core as rc
from rconv.common.checks import as_whole, whole_number, whole_numbers

INTEGERS = [3, np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3), torch.tensor([3]),
            torch.tensor(3, dtype=torch.int16)]
NOT_INTEGERS = [True, False, np.bool_(True), torch.tensor(True), 3.0, 2.5, np.float64(3.0), torch.tensor(3.0),
                torch.tensor([1, 2]), torch.tensor(3 + 0j), "3", None, [3]]


@pytest.mark.parametrize("value", INTEGERS, ids=repr)
def test_as_whole_takes_python_numpy_and_torch_integers(value):
    whole = as_whole(value)
    assert whole == 3 and type(whole) is int


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=repr)
def test_as_whole_refuses_bools_floats_and_everything_else(value):
    assert as_whole(value) is None


def test_whole_number_returns_an_int_within_its_range():
    assert whole_number(np.int64(4), "filters") == 4
    assert whole_number(torch.tensor(0), "padding", least=0) == 0
    assert whole_number(7, "seed", least=0, most=7) == 7


@pytest.mark.parametrize("value,options,message", [
    (0, {}, "filters must be a whole number >= 1; got 0"),
    (True, {}, "filters must be a whole number >= 1; got True"),
    (2.0, {}, "filters must be a whole number >= 1; got 2.0"),
    ("4", {}, "filters must be a whole number >= 1; got '4'"),
    (-1, dict(least=0), "filters must be a whole number >= 0; got -1"),
    (9, dict(least=0, most=8), "filters must be a whole number from 0 to 8; got 9"),
    (None, dict(hint=", or None for the default"), "filters must be a whole number >= 1, or None for the default; "
                                                  "got None"),
])
def test_whole_number_names_the_argument_and_its_range(value, options, message):
    with pytest.raises(rc.RConvError) as error:
        whole_number(value, "filters", **options)
    assert str(error.value) == message


def test_whole_numbers_returns_ints():
    assert whole_numbers([np.int64(1), torch.tensor(2), 3], "counts") == [1, 2, 3]
    assert whole_numbers(range(0, 3), "indices", least=0) == [0, 1, 2]


@pytest.mark.parametrize("values", [[], [1, True], [1, 2.5], [0], 5, None, ["1"]], ids=repr)
def test_whole_numbers_names_the_argument(values):
    with pytest.raises(rc.RConvError) as error:
        whole_numbers(values, "counts")
    assert str(error.value) == f"counts must be whole numbers >= 1; got {values!r}"


def test_whole_numbers_says_what_the_list_holds():
    with pytest.raises(rc.RConvError) as error:
        whole_numbers([4, -1], "counts", least=0, what="filter counts")
    assert str(error.value) == "counts must be a non-empty list of filter counts, whole numbers >= 0; got [4, -1]"
