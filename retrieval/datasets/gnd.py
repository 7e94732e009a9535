"""The pickles of the landmark-retrieval benchmarks, read without running anything the file
could ask for: the ground truth of Revisited Oxford and Paris (``gnd_roxford5k.pkl``,
``gnd_rparis6k.pkl``, :func:`read_gnd`) and cirtorch's SfM-120k training database
(``retrieval-SfM-120k.pkl``, :func:`read_sfm120k`).

The files are Python pickles: a dict with ``imlist`` (gallery image names), ``qimlist`` (query
image names) and ``gnd``, one dict per query with ``bbx`` (x1, y1, x2, y2 of the query's
region, in pixels), ``easy``, ``hard`` and ``junk`` (0-based positions in ``imlist``); lists
or numpy arrays. A plain ``pickle.load`` would import and call whatever the file names, so a
crafted file runs code. :func:`read_gnd` unpickles with a reader that resolves only the numpy
names arrays are rebuilt from (and ``_codecs.encode`` for latin1 text, how pickle protocols 0-2
store an array's bytes) and refuses any other import with one line naming the file.

The SfM-120k database is a dict with ``train`` and ``val``, each a dict with ``cids`` (image
names), ``cluster`` (the 3D model each image belongs to), and ``qidxs`` / ``pidxs`` (the
query-positive pairs its authors verified by structure-from-motion, as positions in ``cids``).

The R1M distractor images of Revisited Oxford / Paris (Radenović et al., CVPR 2018), in the
layout revisitop distributes them::

    revisitop1m/                 <- root
    ├── revisitop1m.txt          the images, one a line: a path under jpg/
    └── jpg/                     the revisitop1m.1.tar.gz ... revisitop1m.100.tar.gz archives,
        └── ...                  extracted

A line without an extension names ``<line>.jpg``, as revisitop's own scripts read it. The list
fixes the set and the order of the distractors; without it (``list_file=None``) every image
under ``jpg/`` is one, in sorted order.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from retrieval.data.images import list_images
from retrieval.data.manifest import ManifestError

__all__ = [
    "QueryTruth",
    "R1M_LIST",
    "RevisitedTruth",
    "SfmSplit",
    "distractor_images",
    "read_gnd",
    "read_sfm120k",
]


# (module, name) pairs a pickled numpy array or scalar needs, under numpy 1 and numpy 2 names
_NUMPY_NAMES = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


_FIX = "use the file the benchmark's authors publish, or rebuild it from plain lists and arrays"


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocols 0-2 pickle bytes (an array's buffer) as: ``_codecs.encode(text,
    "latin1")``, allowed for that use only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin1 text")
    return text.encode("latin1")


def _numpy_object(module: str, name: str) -> Any:
    """The numpy object a pickle names, from numpy 2's private core when it exists."""
    if module == "numpy":
        return getattr(np, name)
    tail = module.rsplit(".", 1)[-1]
    for candidate in (f"numpy._core.{tail}", f"numpy.core.{tail}"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles builtins (dict, list, str, numbers) and numpy arrays; refuses every other
    global (``os.system``, ``builtins.eval``...) before it is imported."""

    def __init__(self, handle: io.BufferedIOBase, path: Path, kind: str) -> None:
        super().__init__(handle)
        self.path, self.kind = path, kind

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_NAMES:
            return _numpy_object(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise ManifestError(
            f"{self.path}: refused to load {module}.{name}; a {self.kind} file holds only lists, "
            f"numbers and numpy arrays ({_FIX})"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ManifestError(f"{self.path}: refused a persistent object id ({_FIX})")


@dataclass(frozen=True)
class QueryTruth:
    """One query: its region and its gallery items by 0-based position in ``imlist``."""

    bbx: tuple[float, float, float, float]
    easy: np.ndarray
    hard: np.ndarray
    junk: np.ndarray


@dataclass(frozen=True)
class RevisitedTruth:
    """A gnd file's content: ``imlist`` (gallery names), ``qimlist`` (query names) and one
    :class:`QueryTruth` per query, in ``qimlist`` order."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[QueryTruth]


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(
        isinstance(n, (str, np.str_)) for n in value
    ):
        raise ManifestError(f"{where}: expected a list of image names ({_FIX})")
    return [str(n) for n in value]


def _positions(value: Any, where: str, size: int) -> np.ndarray:
    array = np.asarray(value if value is not None else [])
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ManifestError(f"{where}: expected a list of integer positions in imlist ({_FIX})")
    if array.min() < 0 or array.max() >= size:
        raise ManifestError(f"{where}: positions must lie in [0, {size}) of imlist ({_FIX})")
    return array.astype(np.int64)


def _query(entry: Any, where: str, size: int) -> QueryTruth:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected a dict with bbx, easy, hard, junk ({_FIX})")
    box = np.asarray(entry.get("bbx", []), dtype=object).reshape(-1)
    try:
        bbx = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        bbx = ()
    if len(bbx) != 4:
        raise ManifestError(f"{where}, field 'bbx': expected 4 numbers x1, y1, x2, y2 ({_FIX})")
    lists = {
        k: _positions(entry.get(k), f"{where}, field '{k}'", size) for k in ("easy", "hard", "junk")
    }
    return QueryTruth((bbx[0], bbx[1], bbx[2], bbx[3]), lists["easy"], lists["hard"], lists["junk"])


def _load_plain(file: Path, kind: str, missing: str) -> Any:
    """Unpickle ``file`` (a ``kind`` pickle) with :class:`_PlainDataUnpickler`: ManifestError
    naming the file when it is missing (``missing`` says what to do), unreadable or names
    anything else."""
    if not file.is_file():
        raise ManifestError(f"{file}: {missing} (see data/README.md)")
    try:
        with open(file, "rb") as handle:
            return _PlainDataUnpickler(handle, file, kind).load()
    except ManifestError:
        raise
    except Exception as err:
        raise ManifestError(f"{file}: not a readable {kind} pickle ({err}); {_FIX}") from None


def read_gnd(path: str | Path) -> RevisitedTruth:
    """Read a revisited gnd pickle safely (see the module docstring) and check its shape.

    Raises:
        ManifestError: a missing file, a file that is not a pickle, one naming anything but
            numpy's array types, or content without the keys and types above; one line each,
            naming the file.
    """
    file = Path(path)
    where = "ground-truth file missing; put the benchmark's gnd_<name>.pkl beside its jpg/ folder"
    data = _load_plain(file, "gnd", where)
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise ManifestError(f"{file}: expected a dict with keys imlist, qimlist, gnd ({_FIX})")
    imlist = _names(data["imlist"], f"{file}, key 'imlist'")
    qimlist = _names(data["qimlist"], f"{file}, key 'qimlist'")
    entries = data["gnd"]
    if not isinstance(entries, (list, tuple)) or len(entries) != len(qimlist):
        raise ManifestError(f"{file}, key 'gnd': expected one entry per query of qimlist ({_FIX})")
    gnd = [_query(e, f"{file}, gnd[{i}]", len(imlist)) for i, e in enumerate(entries)]
    return RevisitedTruth(imlist, qimlist, gnd)


@dataclass(frozen=True)
class SfmSplit:
    """One split of the SfM-120k database: image names, their 3D-model clusters and the
    verified (query, positive) pairs as positions in ``cids``."""

    cids: list[str]
    cluster: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray


def _sfm_split(value: Any, where: str) -> SfmSplit:
    if not isinstance(value, dict) or not {"cids", "cluster", "qidxs", "pidxs"} <= set(value):
        raise ManifestError(f"{where}: expected a dict with cids, cluster, qidxs, pidxs ({_FIX})")
    cids = _names(value["cids"], f"{where}, key 'cids'")
    cluster = np.asarray(value["cluster"])
    if cluster.shape != (len(cids),) or not np.issubdtype(cluster.dtype, np.integer):
        raise ManifestError(f"{where}, key 'cluster': expected one integer per cid ({_FIX})")
    qidxs = _positions(value["qidxs"], f"{where}, key 'qidxs'", len(cids))
    pidxs = _positions(value["pidxs"], f"{where}, key 'pidxs'", len(cids))
    if len(qidxs) != len(pidxs):
        raise ManifestError(f"{where}: qidxs and pidxs differ in length ({_FIX})")
    return SfmSplit(cids, cluster.astype(np.int64), qidxs, pidxs)


def read_sfm120k(path: str | Path) -> dict[str, SfmSplit]:
    """Read cirtorch's ``retrieval-SfM-120k.pkl`` safely (see the module docstring):
    ``{"train": SfmSplit, "val": SfmSplit}``.

    Raises:
        ManifestError: as :func:`read_gnd`, one line naming the file.
    """
    file = Path(path)
    where = "SfM-120k database missing; put cirtorch's retrieval-SfM-120k.pkl beside ims/"
    data = _load_plain(file, "SfM-120k", where)
    if not isinstance(data, dict) or not {"train", "val"} <= set(data):
        raise ManifestError(f"{file}: expected a dict with keys train and val ({_FIX})")
    return {name: _sfm_split(data[name], f"{file}, key {name!r}") for name in ("train", "val")}


#: The list file of the R1M release.
R1M_LIST = "revisitop1m.txt"


_LAYOUT = "root/revisitop1m.txt and root/jpg/... (see data/README.md)"


def _listed(images: Path, list_file: Path) -> list[tuple[int, Path]]:
    """The listed images with their 1-based line numbers; a line must be a relative path that
    stays under ``jpg/``."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ManifestError(f"{list_file}: not UTF-8 text ({err})") from None
    out = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ManifestError(
                f"{list_file}, line {number}: {name!r} is not a path under {images}; use the "
                "list of the R1M release"
            )
        if not relative.suffix:
            relative = relative.with_name(relative.name + ".jpg")
        out.append((number, images / relative))
    return out


def distractor_images(
    root: str | Path, list_file: str | None = R1M_LIST, check_files: bool = True
) -> list[Path]:
    """The distractor images under ``root``, in the list's order.

    Args:
        root: the folder holding ``jpg/`` and the list file.
        list_file: the list, relative to ``root`` (or absolute); None: every image under
            ``jpg/``, sorted.
        check_files: whether every listed image must exist (one ``stat`` each).

    Raises:
        ManifestError: one line naming the file and the fix: ``root``, ``jpg/`` or the list
            missing, a list line that is no path under ``jpg/``, listed images missing (the
            count and the first one), or no image at all.
    """
    base = Path(os.path.abspath(Path(root).expanduser()))
    images = base / "jpg"
    if not images.is_dir():
        what = "is not an existing folder" if not base.is_dir() else "has no jpg/ folder"
        raise ManifestError(
            f"distractors: {base} {what}; layout: {_LAYOUT}; extract the R1M archives there"
        )
    if list_file is None:
        paths = list_images(images)
    else:
        listing = base / list_file
        if not listing.is_file():
            raise ManifestError(
                f"distractors: {listing} is missing; put the release's {R1M_LIST} there "
                f"(layout: {_LAYOUT}), or set distractors.list_file=null to take every image "
                "under jpg/"
            )
        numbered = _listed(images, listing)
        if check_files:
            missing = [(n, p) for n, p in numbered if not p.is_file()]
            if missing:
                line, path = missing[0]
                raise ManifestError(
                    f"{listing}, line {line}: {path} is missing ({len(missing)} of "
                    f"{len(numbered)} listed images are); extract every revisitop1m.N.tar.gz "
                    f"archive into {images}"
                )
        paths = [p for _, p in numbered]
    if not paths:
        raise ManifestError(f"distractors: no image listed under {base}; layout: {_LAYOUT}")
    return paths
