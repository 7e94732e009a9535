"""Calibrate the near-duplicate threshold of `retrieval duplicates` on data=copydetect's test
split (the originals, their 12 edited copies each and the distractors, as one collection):
grouped at every threshold, pair precision and recall recorded.

    python scripts/calibrate_duplicates.py                       # the default pretrained model
    python scripts/calibrate_duplicates.py --model BUNDLE        # a bundle: stored in its manifest

The default model's table is written to retrieval/search/default_duplicates.json (shipped with
the package); a bundle's goes into its manifest.json under "duplicates" (export.py does this
itself when it exports data=copydetect).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from retrieval.search.duplicate_finder import (
    DEFAULT_CALIBRATION,
    DEFAULT_PRECISION,
    calibration,
    default_model,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a bundle (default: the default pretrained model)")
    parser.add_argument("--data", default="data/copydetect", help="data=copydetect's folder")
    parser.add_argument("--precision", type=float, default=DEFAULT_PRECISION)
    parser.add_argument("--out", help="write the calibration here instead")
    args = parser.parse_args()
    manifest = Path(args.data) / "manifest.csv"
    if not manifest.is_file():
        print(
            f"error: {manifest} missing: bash scripts/get_copydetect.sh {args.data}",
            file=sys.stderr,
        )
        return 2
    if args.model:
        from retrieval.bundle.format import read_json
        from retrieval.bundle.runtime import load_runtime
        from retrieval.data.preprocessing import Preprocessing

        folder = Path(args.model)
        pre = Preprocessing.from_json(
            read_json(folder / "preprocessing.json", "no preprocessing.json")
        )
        runtime = load_runtime(folder)
    else:
        pre, runtime, _ = default_model()
    from retrieval.data.manifest import read_manifest, select_split

    rows = select_split(read_manifest(manifest), "test", str(manifest))
    start = time.perf_counter()
    vectors = []
    with tqdm(total=len(rows), unit="img") as bar:
        for i in range(0, len(rows), 64):
            batch = [pre.prepare(str(r.path)) for r in rows[i : i + 64]]
            vectors.append(runtime.embed_many(batch))
            bar.update(len(batch))
    found = calibration(
        np.concatenate(vectors),
        [r.label for r in rows],
        f"{Path(args.data).name} test split",
        precision=args.precision,
    )
    found["seconds"] = round(time.perf_counter() - start, 1)
    result = found
    if args.out or not args.model:
        out = Path(args.out or DEFAULT_CALIBRATION)
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    else:
        from retrieval.bundle.format import update_manifest

        out = update_manifest(args.model, duplicates=result)
    print(
        f"threshold {result['threshold']} (pair precision {result['precision']}, "
        f"recall {result['recall']}) -> {out}"
    )
    for row in result["table"][::5]:
        p, r = row["precision"], row["recall"]
        print(f"  {row['threshold']:.2f}  precision {p:.4f}  recall {r:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
