"""The revisited gnd reader: plain data and numpy arrays load, anything that would run code is
refused before it runs, and malformed content is one line naming the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from retrieval.data.manifest import ManifestError
from retrieval.datasets.gnd import read_gnd


def _gnd(**changes):
    data = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": np.array([1.0, 2.0, 5.5, 7.0]), "easy": np.array([0]), "hard": [2], "junk": []},
            {"bbx": [0, 0, 3, 3], "easy": [], "hard": np.array([1, 2]), "junk": np.array([0])},
        ],
    }
    data.update(changes)
    return data


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_lists_and_numpy_arrays_load(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(_gnd(), protocol=protocol))
    truth = read_gnd(path)
    assert truth.imlist == ["a", "b", "c"] and truth.qimlist == ["q0", "q1"]
    assert truth.gnd[0].bbx == (1.0, 2.0, 5.5, 7.0)
    np.testing.assert_array_equal(truth.gnd[1].hard, [1, 2])
    assert truth.gnd[0].junk.size == 0 and truth.gnd[1].junk.tolist() == [0]


class _RunsCode:
    """Unpickling this calls os.system: what a crafted gnd file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "gnd_rparis6k.pkl"
    path.write_bytes(pickle.dumps(_gnd(extra=_RunsCode(marker))))
    # the same bytes run the command under a plain pickle.load: the test is not vacuous
    if os.name == "posix":
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ManifestError) as info:
        read_gnd(path)
    message = str(info.value)
    assert str(path) in message and "refused" in message and "system" in message
    assert "\n" not in message
    assert not marker.exists()


def test_other_globals_are_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "x": eval}))
    with pytest.raises(ManifestError, match="refused to load builtins.eval"):
        read_gnd(path)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"gnd": []}, "one entry per query"),
        ({"imlist": [1, 2]}, "key 'imlist'"),
        ({"gnd": [{"bbx": [0, 0, 1], "easy": [], "hard": [], "junk": []}, {}]}, "field 'bbx'"),
        ({"gnd": [{"bbx": [0, 0, 1, 1], "easy": [3], "hard": [], "junk": []}] * 2}, "field 'easy'"),
    ],
)
def test_malformed_content_names_the_file_and_the_field(tmp_path, changes, message) -> None:
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(_gnd(**changes)))
    with pytest.raises(ManifestError, match=message) as info:
        read_gnd(path)
    assert str(path) in str(info.value)


def test_missing_and_non_pickle_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="ground-truth file missing"):
        read_gnd(tmp_path / "gnd_roxford5k.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_text("not a pickle")
    with pytest.raises(ManifestError, match="not a readable gnd pickle"):
        read_gnd(bad)
