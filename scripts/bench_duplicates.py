"""Benchmark `retrieval duplicates` against imagededup's perceptual hashes.

    # data=copydetect laid out as one flat folder (hard links; labels.csv beside the images)
    python scripts/bench_duplicates.py flat data/copydetect data/copydetect-flat
    # pair precision / recall of every method on it, and the time each takes
    python scripts/bench_duplicates.py quality data/copydetect-flat [--model BUNDLE ...]
    # grouping time and memory from stored vectors (synthetic clusters), imagededup's
    # hash-distance search beside it on hashes of the same size
    python scripts/bench_duplicates.py scale --sizes 10000 100000

Pairs: two images grouped together (ours: in one group; imagededup: one listed as the
other's duplicate) form a predicted pair; a true pair is two images of one label (an original
and its edited copies). imagededup is a benchmark peer, fetched into ~/.cache with pip, never
a dependency: `pip install --target ~/.cache/retrieval/peers/imagededup imagededup`.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

PEER = Path("~/.cache/retrieval/peers/imagededup").expanduser()


def flat(args: argparse.Namespace) -> int:
    """Hard-link the test split of a copy-detection manifest into one flat folder."""
    from retrieval.data.manifest import read_manifest, select_split

    manifest = Path(args.data) / "manifest.csv"
    rows = select_split(read_manifest(manifest), "test", str(manifest))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "source"])
        for number, row in enumerate(rows):
            name = f"{number:05d}{row.path.suffix.lower()}"
            if not (out / name).exists():
                os.link(row.path, out / name)
            writer.writerow([name, row.label, str(row.path)])
    print(f"{len(rows)} images in {out} (labels in {out / 'labels.csv'})")
    return 0


def _labels(folder: Path) -> dict[str, str]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        return {row["file"]: row["label"] for row in csv.DictReader(handle)}


def _score(pairs: set[tuple[str, str]], labels: dict[str, str]) -> tuple[float, float, float, int]:
    """(precision, precision over the pairs with an original or a copy, recall, predicted
    pairs) of unordered file-name pairs. Two distractors grouped count against the first
    precision only: the labels do not say whether they are copies (look-alike emoji, charts)."""
    sizes = Counter(labels.values())
    true_total = sum(c * (c - 1) // 2 for c in sizes.values())
    correct = sum(labels[a] == labels[b] for a, b in pairs)
    known = [p for p in pairs if sizes[labels[p[0]]] > 1 or sizes[labels[p[1]]] > 1]
    precision = correct / len(pairs) if pairs else 1.0
    precision_known = correct / len(known) if known else 1.0
    return precision, precision_known, correct / true_total, len(pairs)


def _group_pairs(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted((a, b))) for g in groups for a in g for b in g if a < b}  # type: ignore[misc]


def _ours(folder: Path, model: str | None) -> tuple[set[tuple[str, str]], float, str]:
    from retrieval.search.duplicate_finder import find_duplicates

    start = time.perf_counter()
    report = find_duplicates(folder, model=model, cache=None)
    took = time.perf_counter() - start
    groups = [[Path(m.path).name for m in g.members] for g in report.groups]
    return _group_pairs(groups), took, f"{report.threshold:.2f} ({report.threshold_source})"


def _imagededup(folder: Path, method: str) -> tuple[set[tuple[str, str]], float]:
    sys.path.append(str(PEER))
    import imagededup.methods as methods

    hasher = getattr(methods, method)(verbose=False)
    start = time.perf_counter()
    found = hasher.find_duplicates(image_dir=str(folder))
    took = time.perf_counter() - start
    pairs = {tuple(sorted((a, b))) for a, dups in found.items() for b in dups}
    return pairs, took  # type: ignore[return-value]


def quality(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    labels = _labels(folder)
    rows = []
    for model in [None, *args.model]:
        pairs, took, threshold = _ours(folder, model)
        name = f"retrieval duplicates --model {model}" if model else "retrieval duplicates"
        rows.append((name, threshold, *_score(pairs, labels), took))
        print(rows[-1], flush=True)
    if not PEER.is_dir():
        print(f"imagededup not found in {PEER}: skipped (see the module's description)")
    else:
        for method in ("PHash", "DHash", "WHash"):
            pairs, took = _imagededup(folder, method)
            rows.append((f"imagededup {method}", "default", *_score(pairs, labels), took))
            print(rows[-1], flush=True)
    lines = [
        f"{len(labels)} images, {sum(c * (c - 1) // 2 for c in Counter(labels.values()).values())}"
        " true pairs",
        "",
        "| method | threshold | pair precision | precision, pairs with an original or copy | "
        "pair recall | pairs | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {t} | {p:.4f} | {pk:.4f} | {r:.4f} | {c} | {s:.0f} |"
        for n, t, p, pk, r, c, s in rows
    ]
    print("\n".join(lines))
    return 0


def _clusters(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n unit float32 vectors: groups of 1-5 near copies around random centres (made in
    chunks, so that no float64 copy of them raises the process's peak memory)."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n), rng.integers(1, 6, size=n))[:n]
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 10_000):
        part = owner[start : start + 10_000]
        noise = rng.standard_normal((len(part), dim), dtype=np.float32) * 0.15
        x[start : start + len(part)] = _centres(part, dim, seed) + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _centres(owners: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The random centre of each owner id, the same for an id wherever it is asked for."""
    return np.stack(
        [np.random.default_rng([seed, int(o)]).standard_normal(dim, np.float32) for o in owners]
    )


def _scale_one(n: int, dim: int) -> None:
    """Run in a fresh process: group n synthetic vectors, print seconds and peak memory."""
    from retrieval.search.duplicates import FileFacts, group_duplicates

    x = _clusters(n, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    facts = [FileFacts(f"{i:07d}") for i in range(n)]
    start = time.perf_counter()
    groups = group_duplicates(x, facts, threshold=0.8)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vectors_mb = x.nbytes / 1e6
    beyond, whole = (peak - before) / 1e3, peak / 1e3
    print(f"ours {n} {took:.1f} {beyond:.0f} {vectors_mb:.0f} {len(groups)} {whole:.0f}")


def _scale_peer(n: int) -> None:
    """imagededup's search of n 64-bit hashes (hamming distance <= 10), as its hashing
    methods run it after hashing; synthetic hashes in groups of 1-5 near copies."""
    sys.path.append(str(PEER))
    from imagededup.methods import PHash

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=n, dtype=np.int64)
    owner = np.repeat(np.arange(n), rng.integers(1, 6, size=n))[:n]
    flips = rng.integers(0, 64, size=(n, 3))
    codes = base[owner] ^ np.bitwise_or.reduce(np.int64(1) << flips, axis=1)
    encoding = {f"{i:07d}": format(int(c) & (2**64 - 1), "016x") for i, c in enumerate(codes)}
    start = time.perf_counter()
    PHash(verbose=False).find_duplicates(encoding_map=encoding, max_distance_threshold=10)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"imagededup {n} {took:.1f} {peak / 1e3:.0f}")


def scale(args: argparse.Namespace) -> int:
    print(
        "| method | vectors | seconds | peak memory beyond the start (MB) | vectors (MB) | groups |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        for who in ("ours", "peer"):
            if who == "peer" and not PEER.is_dir():
                continue
            command = [sys.executable, __file__, "_one", who, str(n), str(args.dim)]
            try:
                out = subprocess.run(
                    command, capture_output=True, text=True, timeout=args.timeout, check=True
                ).stdout.split()
            except subprocess.TimeoutExpired:
                print(f"| {who} | {n} | over {args.timeout} s | | | |")
                continue
            if who == "ours":
                print(
                    f"| retrieval group_duplicates (k=32, exact) | {n} | {out[2]} | {out[3]} | "
                    f"{out[4]} | {out[5]} |"
                )
            else:
                who = "imagededup hash search (Cython brute force, hamming <= 10)"
                print(f"| {who} | {n} | {out[2]} | {out[3]} (whole process) | | |")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_one":
        who, n, dim = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        _scale_one(n, dim) if who == "ours" else _scale_peer(n)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("flat")
    p.add_argument("data")
    p.add_argument("out")
    p.set_defaults(run=flat)
    p = sub.add_parser("quality")
    p.add_argument("folder")
    p.add_argument("--model", action="append", default=[], help="also a bundle's model")
    p.set_defaults(run=quality)
    p = sub.add_parser("scale")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--timeout", type=int, default=1800)
    p.set_defaults(run=scale)
    args = parser.parse_args()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
