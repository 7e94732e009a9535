"""Official dataset layouts → manifest CSVs with the zero-shot DML splits. Each converter reads the
layout under ``root`` (data/README.md), checks every listed image exists, writes ``output`` (default
``root/manifest.csv``) with paths relative to ``root``, returns it; bad layouts: ManifestError."""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from retrieval.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images, open_checked
from retrieval.data.manifest import ManifestError, ManifestRow, read_manifest, write_manifest
from retrieval.datasets.copydetect import prepare_copydetect
from retrieval.datasets.gnd import QueryTruth, read_gnd, read_sfm120k
from retrieval.infra.io import atomic_write

_README = "see data/README.md for the expected layout"


def _root(root: str | Path, dataset: str) -> Path:
    """Absolute dataset root (symlinks kept); it must be an existing folder."""
    base = Path(os.path.abspath(Path(root).expanduser()))
    if not base.is_dir():
        raise ManifestError(f"{dataset}: dataset root {base} is not an existing folder ({_README})")
    return base


def _need(base: Path, names: Sequence[str], dataset: str, layout: str) -> Path:
    """The first of ``names`` that exists under ``base``; otherwise an error naming them all."""
    for name in names:
        if (base / name).exists():
            return base / name
    wanted = " or ".join(repr(n) for n in names)
    raise ManifestError(f"{dataset}: {wanted} missing under {base}; layout: {layout} ({_README})")


def _table(path: Path, width: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """Non-blank lines after ``skip`` lines split on whitespace into exactly ``width`` fields
    (the last keeps inner spaces), with 1-based line numbers."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err})") from None
    numbered = enumerate(lines[skip:], start=skip + 1)
    table = [(n, line.split(maxsplit=width - 1)) for n, line in numbered if line.strip()]
    for number, fields in table:
        if len(fields) != width:
            raise ManifestError(f"{path}, line {number}: expected {width} fields, got {fields}")
    return table


def _int(value: object, where: str, name: str) -> int:
    """``value`` as an int; otherwise an error naming the place and the field."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise ManifestError(f"{where}, field '{name}': {value!r} is not an integer") from None


def _finish(rows: list[ManifestRow], base: Path, output: str | Path | None, dataset: str) -> Path:
    """Check the listed images exist, then write the manifest relative to ``base``."""
    if not rows:
        raise ManifestError(f"{dataset}: the annotations under {base} list no images ({_README})")
    missing = [str(r.path) for r in rows if not r.path.is_file()]
    if missing:
        raise ManifestError(
            f"{dataset}: {len(missing)} of {len(rows)} listed images are missing under {base} "
            f"(first: {'; '.join(missing[:5])}); the archive may be only partly extracted"
        )
    out = Path(output).expanduser() if output is not None else base / "manifest.csv"
    return write_manifest(rows, out, root=base)


def cub200(root: str | Path, output: str | Path | None = None) -> Path:
    """CUB-200-2011: classes 1-100 train, 101-200 test; ``root`` may also be its parent folder."""
    base = given = _root(root, "cub200")
    if not (base / "images.txt").exists() and (base / "CUB_200_2011").is_dir():
        base = base / "CUB_200_2011"
    layout = "images.txt, image_class_labels.txt, images/<class folder>/<image>.jpg"
    images = _table(_need(base, ["images.txt"], "cub200", layout), 2)
    labels_file = _need(base, ["image_class_labels.txt"], "cub200", layout)
    labels = {image_id: cls for _, (image_id, cls) in _table(labels_file, 2)}
    _need(base, ["images"], "cub200", layout)
    rows = []
    for number, (image_id, rel) in images:
        where = f"{base / 'images.txt'}, line {number}"
        if image_id not in labels:
            raise ManifestError(f"{where}: image id {image_id} is not in {labels_file}")
        cls = _int(labels[image_id], f"{labels_file}, image id {image_id}", "class_id")
        rows.append(ManifestRow(base / "images" / rel, str(cls), "train" if cls <= 100 else "test"))
    return _finish(rows, given, output, "cub200")


def _cars_mat(path: Path) -> list[tuple[str, int]]:
    """(relative_im_path, class) pairs from the struct array ``annotations`` in cars_annos.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        hint = "run 'pip install scipy' or provide cars_annos.csv (relative_im_path,class)"
        raise ManifestError(f"{path}: reading .mat files needs scipy; {hint}") from None
    try:
        annotations = loadmat(str(path), squeeze_me=True)["annotations"].reshape(-1)
    except Exception as err:
        raise ManifestError(f"{path}: cannot read the struct array 'annotations' ({err})") from None
    fields = annotations.dtype.names or ()
    if "relative_im_path" not in fields or "class" not in fields:
        raise ManifestError(f"{path}: 'annotations' lacks relative_im_path or class: {fields}")
    return [
        (str(a["relative_im_path"]), _int(a["class"], f"{path}, annotation {i + 1}", "class"))
        for i, a in enumerate(annotations)
    ]


def _cars_csv(path: Path) -> list[tuple[str, int]]:
    """(relative_im_path, class) pairs from cars_annos.csv (header row required)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"relative_im_path", "class"} <= set(reader.fieldnames or []):
            raise ManifestError(f"{path}, row 1: needs the columns relative_im_path,class")
        return [
            (r["relative_im_path"].strip(), _int(r["class"], f"{path}, row {i}", "class"))
            for i, r in enumerate(reader, start=2)
        ]


def cars196(root: str | Path, output: str | Path | None = None) -> Path:
    """Stanford Cars: classes 1-98 train, 99-196 test (the official ``test`` flag is ignored)."""
    base = _root(root, "cars196")
    layout = "cars_annos.mat (or cars_annos.csv: relative_im_path,class) and car_ims/<image>.jpg"
    annos = _need(base, ["cars_annos.mat", "cars_annos.csv"], "cars196", layout)
    pairs = _cars_mat(annos) if annos.suffix == ".mat" else _cars_csv(annos)
    rows = [ManifestRow(base / rel, str(c), "train" if c <= 98 else "test") for rel, c in pairs]
    return _finish(rows, base, output, "cars196")


def sop(root: str | Path, output: str | Path | None = None) -> Path:
    """Stanford Online Products: Ebay_train.txt → train, Ebay_test.txt → test; extra column
    ``category`` is the super_class_id."""
    base = _root(root, "sop")
    header = ["image_id", "class_id", "super_class_id", "path"]
    layout = f"Ebay_train.txt and Ebay_test.txt (header '{' '.join(header)}'), <category>_final/"
    rows = []
    for split in ("train", "test"):
        path = _need(base, [f"Ebay_{split}.txt"], "sop", layout)
        table = _table(path, 4)
        if not table or table[0] != (1, header):
            raise ManifestError(f"{path}, line 1: expected the header '{' '.join(header)}'")
        for number, (_, cls, sup, rel) in table[1:]:
            at = f"{path}, line {number}"
            extra = {"category": str(_int(sup, at, "super_class_id"))}
            rows.append(ManifestRow(base / rel, str(_int(cls, at, "class_id")), split, extra=extra))
    return _finish(rows, base, output, "sop")


_INSHOP_STATUS = {"train": ("train", False, False), "query": ("test", True, False)}
_INSHOP_STATUS["gallery"] = ("test", False, True)


def inshop(root: str | Path, output: str | Path | None = None) -> Path:
    """In-Shop Clothes: status train → train; query/gallery → test with is_query/is_gallery.
    Images are under ``img/``, ``Img/img/`` or ``Img/`` (the first holding the first listed
    image); the partition file may also be under ``Eval/``."""
    base = _root(root, "inshop")
    layout = "list_eval_partition.txt (or Eval/list_eval_partition.txt) and img/<...>/<image>.jpg"
    names = ["list_eval_partition.txt", "Eval/list_eval_partition.txt"]
    part = _need(base, names, "inshop", layout)
    _need(base, ["img", "Img"], "inshop", layout)
    with open(part, encoding="utf-8") as handle:
        count = _int(handle.readline(), f"{part}, line 1", "image count")
    table = _table(part, 3, skip=1)
    if not table or table[0][1] != ["image_name", "item_id", "evaluation_status"]:
        raise ManifestError(f"{part}, line 2: expected 'image_name item_id evaluation_status'")
    if count != len(table) - 1:
        raise ManifestError(f"{part}, line 1: says {count} images but lists {len(table) - 1}")
    first = table[1][1][0].removeprefix("img/") if count else ""
    prefix = next((p for p in ("img", "Img/img", "Img") if (base / p / first).is_file()), "img")
    rows = []
    for number, (name, item, status) in table[1:]:
        if status not in _INSHOP_STATUS:
            where = f"{part}, line {number}, field 'evaluation_status'"
            raise ManifestError(f"{where}: {status!r} is not train, query or gallery")
        split, is_query, is_gallery = _INSHOP_STATUS[status]
        rel = f"{prefix}/{name[4:]}" if name.startswith("img/") else name
        rows.append(ManifestRow(base / rel, item, split, is_query, is_gallery))
    return _finish(rows, base, output, "inshop")


def image_folder(
    root: str | Path, output: str | Path | None = None, test_fraction: float = 0.5, seed: int = 0
) -> Path:
    """Generic ``root/<label>/<images>``: labels (folder names, hidden ones skipped) sorted, then
    shuffled with ``seed``; the first ``round(n * (1 - test_fraction))`` are train, the rest
    test. Label folders without images are ignored; files directly in ``root`` are ignored."""
    base = _root(root, "folder")
    if not 0.0 <= test_fraction <= 1.0:
        raise ManifestError(f"folder: test_fraction must be in [0, 1], got {test_fraction}")
    layout = f"{base}/<label>/<image files> ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    images = {f.name: files for f in folders if (files := list_images(f))}
    if not images:
        what = "image files in the label folders" if folders else "label folders"
        raise ManifestError(f"folder: no {what} under {base}; expected {layout}")
    labels = sorted(images)
    random.Random(seed).shuffle(labels)
    train = set(labels[: round(len(labels) * (1 - test_fraction))])
    split = {label: "train" if label in train else "test" for label in images}
    rows = [ManifestRow(p, label, split[label]) for label in sorted(images) for p in images[label]]
    return _finish(rows, base, output, "folder")


def _crop_query(source: Path, box: QueryTruth, target: Path, gnd_file: Path, index: int) -> None:
    """Write the query's region (its bbx, each coordinate rounded as Pillow's crop rounds it)
    as a lossless PNG, so the embedded query is those pixels exactly."""
    try:
        image = open_checked(source, DEFAULT_MAX_PIXELS, str(source)).convert("RGB")
    except Exception as err:
        raise ManifestError(f"{source}: cannot read the query image ({err})") from None
    x1, y1, x2, y2 = (int(round(v)) for v in box.bbx)
    width, height = image.size
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ManifestError(
            f"{gnd_file}, gnd[{index}], field 'bbx': {box.bbx} is outside the {width}x{height} "
            f"image {source.name}; the gnd file does not belong to these images (fetch both "
            "from the same release)"
        )
    with atomic_write(target, "wb") as handle:
        image.crop((x1, y1, x2, y2)).save(handle, format="PNG")


def _revisited(name: str, root: str | Path, output: str | Path | None) -> Path:
    """Revisited Oxford / Paris: ``jpg/<name>.jpg`` and ``gnd_<name>.pkl``. Gallery rows are
    the ``imlist`` images; query rows are the ``qimlist`` images cropped to their bounding
    boxes (written beside the manifest, in ``<manifest stem>_queries/``) with the columns
    ``gnd_easy``, ``gnd_hard`` and ``gnd_junk`` listing gallery labels (image names)."""
    base = _root(root, name)
    layout = f"jpg/<image>.jpg and gnd_{name}.pkl"
    gnd_file = _need(base, [f"gnd_{name}.pkl"], name, layout)
    images = _need(base, ["jpg"], name, layout)
    truth = read_gnd(gnd_file)
    out = Path(output).expanduser() if output is not None else base / "manifest.csv"
    crops = out.parent / f"{out.stem}_queries"
    known = set(truth.imlist)
    rows = [ManifestRow(images / f"{n}.jpg", n, "test", False, True) for n in truth.imlist]
    for index, (query, box) in enumerate(zip(truth.qimlist, truth.gnd, strict=True)):
        source = images / f"{query}.jpg"
        if not source.is_file():
            raise ManifestError(
                f"{gnd_file}, qimlist[{index}]: query image {query!r} is not in {images}; "
                "extract the full jpg archive of the benchmark there"
            )
        if query in known:
            raise ManifestError(
                f"{gnd_file}, qimlist[{index}]: query {query!r} is also in imlist; the revisited "
                "protocol keeps queries out of the gallery (use the revisited gnd file)"
            )
        target = crops / f"{query}.png"
        _crop_query(source, box, target, gnd_file, index)
        extra = {
            f"gnd_{kind}": " ".join(truth.imlist[i] for i in getattr(box, kind).tolist())
            for kind in ("easy", "hard", "junk")
        }
        rows.append(ManifestRow(target, query, "test", True, False, extra=extra))
    return _finish(rows, base, out, name)


def roxford5k(root: str | Path, output: str | Path | None = None) -> Path:
    """Revisited Oxford 5k (ROxford5k): see :func:`_revisited`."""
    return _revisited("roxford5k", root, output)


def rparis6k(root: str | Path, output: str | Path | None = None) -> Path:
    """Revisited Paris 6k (RParis6k): see :func:`_revisited`."""
    return _revisited("rparis6k", root, output)


def sfm120k(root: str | Path, output: str | Path | None = None) -> Path:
    """cirtorch's SfM-120k training set (Radenović et al., TPAMI 2019), as its download lays it
    out: ``retrieval-SfM-120k.pkl`` beside ``ims/``, each image at
    ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``. Every image's label is its 3D model
    (``cluster``): the ``train`` split's images train, the ``val`` split's (other 3D models)
    are the ``test`` split that validation searches. Labels are prefixed with their split, so
    that a cluster number in both splits names two models."""
    base = _root(root, "sfm120k")
    layout = "retrieval-SfM-120k.pkl and ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>"
    database = read_sfm120k(_need(base, ["retrieval-SfM-120k.pkl"], "sfm120k", layout))
    images = _need(base, ["ims"], "sfm120k", layout)
    rows = []
    for name, split in (("train", "train"), ("val", "test")):
        part = database[name]
        for cid, cluster in zip(part.cids, part.cluster.tolist(), strict=True):
            path = images / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
            rows.append(ManifestRow(path, f"{name}-{cluster}", split))
    return _finish(rows, base, output, "sfm120k")


def _csv_column(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV with a header holding ``columns``, with their 1-based row numbers."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}, row 1: needs the column(s) {', '.join(columns)}")
        return [(n, row) for n, row in enumerate(reader, start=2)]


def _gldv2_path(base: Path, folder: str, image_id: str) -> Path:
    return base / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


_GLDV2_USAGE = {"private": {"Private"}, "public": {"Public"}, "all": {"Private", "Public"}}


def gldv2(root: str | Path, output: str | Path | None = None, usage: str = "private") -> Path:
    """Google Landmarks v2, retrieval track: ``index.csv`` and ``test.csv`` (column ``id``),
    ``retrieval_solution_v2.1.csv`` (``id,images,Usage``: the relevant index ids of each test
    query, space-separated) and the images at ``index/a/b/c/<id>.jpg`` and
    ``test/a/b/c/<id>.jpg``. Queries of the chosen ``usage`` (``private``: the test set papers
    report, ``public``: the validation set, ``all``) become query rows with the column
    ``gnd_relevant``; ``Ignored`` queries are left out."""
    if usage not in _GLDV2_USAGE:
        raise ManifestError(f"gldv2: usage must be one of {', '.join(_GLDV2_USAGE)}, got {usage!r}")
    base = _root(root, "gldv2")
    layout = "index.csv, test.csv, retrieval_solution_v2.1.csv, index/a/b/c/<id>.jpg, test/..."
    index = _csv_column(_need(base, ["index.csv"], "gldv2", layout), ["id"])
    tests = {
        r["id"].strip() for _, r in _csv_column(_need(base, ["test.csv"], "gldv2", layout), ["id"])
    }
    solution = _need(base, ["retrieval_solution_v2.1.csv"], "gldv2", layout)
    ids = [r["id"].strip() for _, r in index]
    known = set(ids)
    rows = [ManifestRow(_gldv2_path(base, "index", i), i, "test", False, True) for i in ids]
    for number, row in _csv_column(solution, ["id", "images", "Usage"]):
        if row["Usage"].strip() not in _GLDV2_USAGE[usage]:
            continue
        query, relevant = row["id"].strip(), row["images"].split()
        where = f"{solution}, row {number}"
        if query not in tests:
            raise ManifestError(
                f"{where}: query {query!r} is not in test.csv; use the matching test.csv"
            )
        if unknown := [i for i in relevant if i not in known]:
            raise ManifestError(
                f"{where}: index id {unknown[0]!r} is not in index.csv; use the matching index.csv"
            )
        extra = {"gnd_relevant": " ".join(relevant)}
        rows.append(
            ManifestRow(_gldv2_path(base, "test", query), query, "test", True, False, extra=extra)
        )
    return _finish(rows, base, output, "gldv2")


def _images_by_id(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in list_images(folder)}


def disc21(root: str | Path, output: str | Path | None = None) -> Path:
    """DISC2021 (copy detection): query images in ``queries/`` (or ``dev_queries/``,
    ``final_queries/``), references in ``references/``, optional ``training/``, and the public
    ground truth ``public_ground_truth.csv`` (or ``dev_ground_truth.csv``) with the columns
    ``query_id,reference_id`` (empty reference: the query has no match). A query's label is its
    reference's id, or its own id when it has none, so µAP counts it with only false
    positives. Training images are the ``train`` split: the background ``score_norm`` uses."""
    base = _root(root, "disc21")
    layout = "queries/, references/, [training/], public_ground_truth.csv"
    queries = _images_by_id(
        _need(base, ["queries", "dev_queries", "final_queries"], "disc21", layout)
    )
    references = _images_by_id(_need(base, ["references"], "disc21", layout))
    truth_file = _need(base, ["public_ground_truth.csv", "dev_ground_truth.csv"], "disc21", layout)
    match: dict[str, str] = {}
    for number, row in _csv_column(truth_file, ["query_id", "reference_id"]):
        query, reference = row["query_id"].strip(), (row["reference_id"] or "").strip()
        where = f"{truth_file}, row {number}"
        if query not in queries:
            raise ManifestError(f"{where}: query {query!r} has no image in the queries folder")
        if reference and reference not in references:
            raise ManifestError(f"{where}: reference {reference!r} has no image in references/")
        if reference:
            match[query] = reference
    rows = [ManifestRow(p, r, "test", False, True) for r, p in sorted(references.items())]
    rows += [
        ManifestRow(p, match.get(q, q), "test", True, False) for q, p in sorted(queries.items())
    ]
    if (base / "training").is_dir():
        rows += [
            ManifestRow(p, t, "train", False, True)
            for t, p in sorted(_images_by_id(base / "training").items())
        ]
    return _finish(rows, base, output, "disc21")


CONVERTERS: dict[str, Callable[..., Path]] = dict(
    cub200=cub200,
    cars196=cars196,
    sop=sop,
    inshop=inshop,
    folder=image_folder,
    copydetect=prepare_copydetect,
    roxford5k=roxford5k,
    rparis6k=rparis6k,
    gldv2=gldv2,
    disc21=disc21,
    sfm120k=sfm120k,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: convert, print the manifest path and the images and labels per split.
    Returns 0; bad arguments exit with status 2, a ManifestError exits with status 1."""
    about = "Write a manifest CSV from a dataset's official layout (see data/README.md)."
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.datasets.converters", description=about
    )
    parser.add_argument("dataset", choices=list(CONVERTERS))
    parser.add_argument("root", type=Path, help="dataset root folder")
    parser.add_argument("--output", type=Path, help="manifest path (default: ROOT/manifest.csv)")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="folder only")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="folder: label shuffle; copydetect: held-out sample, edits",
    )
    args = parser.parse_args(argv)
    kw: dict[str, float | int] = {}
    if args.dataset == "folder":
        kw = {"test_fraction": args.test_fraction, "seed": args.seed}
    elif args.dataset == "copydetect":
        kw = {"seed": args.seed}
    try:
        out = CONVERTERS[args.dataset](args.root, args.output, **kw)
    except ManifestError as err:
        parser.exit(1, f"error: {err}\n")
    rows = read_manifest(out, root=args.root, check_files=False)
    print(out)
    for split, n in Counter(r.split for r in rows).items():
        print(f"{split}: {n} images, {len({r.label for r in rows if r.split == split})} labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
