"""retrieval.infra.checks: each argument rule, worded once, against hand-picked values."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.infra.checks import checked_vectors, int_array, is_int, positive_int, unit_rows


def test_is_int_takes_python_and_numpy_integers_but_not_bools():
    assert is_int(3) and is_int(np.int64(3)) and is_int(np.uint8(0))
    assert not any(is_int(v) for v in (True, np.bool_(True), 3.0, "3", None))


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "2", None])
def test_positive_int_refuses_what_is_not_a_positive_integer(value):
    with pytest.raises(ValueError, match=rf"^k must be a positive integer, got {value!r}$"):
        positive_int(value, "k")


def test_positive_int_returns_an_int_and_keeps_an_upper_bound():
    assert positive_int(np.int32(4), "k") == 4 and type(positive_int(np.int32(4), "k")) is int
    assert positive_int(5, "dim", maximum=5) == 5
    with pytest.raises(ValueError, match=r"dim must be an integer from 1 to 5, got 6"):
        positive_int(6, "dim", maximum=5)


def test_vectors_converts_to_contiguous_float32_and_names_what_is_wrong():
    x = np.arange(6, dtype=np.int64).reshape(3, 2)
    out = checked_vectors(x, "xb", dim=2, rows=3)
    assert out.dtype == np.float32 and out.flags.c_contiguous and (out == x).all()
    with pytest.raises(ValueError, match=r"xb must be a 2-D float array of shape \(n, 3\), got"):
        checked_vectors(x, "xb", dim=3)
    with pytest.raises(ValueError, match=r"of shape \(4, d\), got \(3, 2\)"):
        checked_vectors(x, "xb", rows=4)
    with pytest.raises(ValueError, match=r"xq must be a 2-D float array of shape \(n, d\)"):
        checked_vectors(x[0], "xq")
    with pytest.raises(ValueError, match="xq must be a 2-D float .*dtype int64"):
        checked_vectors(x, "xq", integers=False)
    with pytest.raises(ValueError, match="xq must hold real numbers, got dtype bool"):
        checked_vectors(x > 2, "xq")
    with pytest.raises(ValueError, match=r"query is empty: need a non-empty 2-D array"):
        checked_vectors(np.zeros((0, 2)), "query", empty=False)
    assert checked_vectors(np.zeros((0, 2)), "query").shape == (0, 2)
    with pytest.raises(ValueError, match="gallery contains NaN or infinite values"):
        checked_vectors(np.array([[1.0, np.nan]]), "gallery")
    with pytest.raises(ValueError, match="contains NaN or infinite values"):
        checked_vectors(np.array([[1e39, 0.0]]), "gallery")  # finite in float64, not in float32


def test_unit_rows_names_the_first_row_off_the_unit_sphere():
    x = np.array([[1.0, 0.0], [0.6, 0.8], [3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    head = x[:2]
    assert unit_rows(head, "vectors", 1e-3) is head
    with pytest.raises(ValueError, match=r"row 2 has norm 5.0000 \(2 such rows\)"):
        unit_rows(x, "vectors", 1e-3)


def test_int_array_wants_integers_of_the_given_length():
    assert int_array(np.array([1, 2], np.int32), 2, "ids").dtype == np.int64
    for bad in (np.array([1.0, 2.0]), np.array([1, 2, 3])):
        with pytest.raises(ValueError, match=r"ids must be an integer array of shape \(2,\)"):
            int_array(bad, 2, "ids")
