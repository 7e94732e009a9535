"""Retrieval quality on the real-image benchmarks: the pretrained backbone as-is against the
trained recipe, on data=emoji (cross-style, zero-shot) and data=copydetect (edited copies found
through an exported bundle). Runs the same commands a user types and writes one table.

    bash scripts/get_emoji.sh data/emoji && bash scripts/get_copydetect.sh data/copydetect
    python scripts/bench_quality.py                       # both benchmarks, the recipes' defaults
    python scripts/bench_quality.py --part emoji --set trainer.max_epochs=2   # a shorter run
    python scripts/bench_quality.py --out experiments/DATE_bench_quality_gpu.md --set trainer=gpu
    python scripts/bench_quality.py --part sscd         # SSCD and its student as peers
    python scripts/bench_quality.py --part copydetect sscd --trained-bundle BUNDLE

Copy detection rows: the default export of the pretrained backbone, ``experiment=copydetect``
trained and exported with ``postprocess=[whiten_edits,score_norm]
postprocess.whiten.shrinkage=0`` as the README says (or ``--trained-bundle``),
and the peers SSCD and its MobileNetV4 student (``scripts/sscd_peer.py``).

Each row: R@1 (the query's label first), MAP@R (leave-one-out, emoji), µAP over the top 10
(DISC2021, copydetect), and the wall time of the step. Copy detection is scored with
``retrieval score`` on the bundle, i.e. through Retriever with the bundle's own preprocessing,
runtime and index, as a search service would answer.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], log: Path) -> float:
    """Run a command from the repository root, output to ``log``; its wall time in seconds."""
    print("$", " ".join(args), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}; see {log}")
    return time.perf_counter() - start


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def emoji(work: Path, extra: list[str]) -> list[dict]:
    """Baseline through evaluate.py, then experiment=emoji through train.py."""
    py = sys.executable
    base_dir, train_dir = work / "emoji_eval", work / "emoji_train"
    secs = run(
        [py, "evaluate.py", "data=emoji", "logger=csv", f"hydra.run.dir={base_dir}"],
        work / "emoji_eval.log",
    )
    base = metrics_of(base_dir)
    rows = [
        dict(
            bench="emoji",
            model="pretrained backbone as-is (evaluate.py)",
            r1=base["test/recall@1"],
            mapr=base["test/map@r"],
            seconds=secs,
        )
    ]
    cmd = ["train.py", "experiment=emoji", "logger=csv", f"hydra.run.dir={train_dir}", *extra]
    secs = run([py, *cmd], work / "emoji_train.log")
    trained = metrics_of(train_dir)
    rows.append(
        dict(
            bench="emoji",
            model=f"trained: python {' '.join(cmd[:2] + extra)}",
            r1=trained["val/recall@1"],
            mapr=trained["val/map@r"],
            seconds=secs,
        )
    )
    return rows


def score(bundle: Path, manifest: Path, log: Path) -> tuple[dict, float]:
    out = log.with_suffix(".json")
    args = ["retrieval", "score", str(bundle), str(manifest), "-k", "10", "--json"]
    print("$", " ".join(args), flush=True)
    start = time.perf_counter()
    with out.open("w") as handle:
        done = subprocess.run(args, cwd=ROOT, stdout=handle, stderr=log.open("w"))
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}; see {log}")
    return json.loads(out.read_text()), time.perf_counter() - start


MANIFEST = ROOT / "data" / "copydetect" / "manifest.csv"


def score_row(model: str, bundle: Path, seconds: float, work: Path) -> dict:
    """A copydetect row: ``retrieval score`` of ``bundle`` (its time added to ``seconds``);
    images/s is the queries searched per second (decoding, embedding and search)."""
    result, search = score(bundle, MANIFEST, work / f"score_{bundle.name}.log")
    return dict(
        bench="copydetect",
        model=model,
        r1=result["recall@1"],
        uap=result["micro_ap@10"],
        seconds=seconds + search,
        images_per_s=1.0 / result["seconds_per_query"],
        edits=result["recall@1_by_edit"],
    )


def sscd(work: Path) -> list[dict]:
    """SSCD and its student as peers (scripts/sscd_peer.py), on the same manifest."""
    from sscd_peer import fetch
    from sscd_peer import score as peer_score

    rows = []
    for name, path in fetch().items():
        start = time.perf_counter()
        result = peer_score(MANIFEST, path)
        rows.append(
            dict(
                bench="copydetect",
                model=f"peer: {name}, short side 288",
                r1=result["r1"],
                uap=result["uap"],
                uap_norm=result["uap_norm"],
                seconds=time.perf_counter() - start,
                images_per_s=result["images_per_s"],
                edits=result["edits"],
            )
        )
    return rows


def copydetect(work: Path, extra: list[str], trained: Path | None = None) -> list[dict]:
    """The pretrained default export, then experiment=copydetect trained and exported (or the
    bundle ``trained`` given), each scored through its bundle."""
    py = sys.executable
    rows = []
    secs = run(
        [py, "export.py", "data=copydetect", f"bundle={work}/cd_base", f"hydra.run.dir={work}/e0"],
        work / "cd_export_base.log",
    )
    rows.append(
        score_row("pretrained backbone, default export (export.py)", work / "cd_base", secs, work)
    )
    if trained is not None:
        return rows + [score_row(f"trained bundle {trained}", trained, 0.0, work)]
    cmd = ["train.py", "experiment=copydetect", "logger=csv", f"hydra.run.dir={work}/cd", *extra]
    secs = run([py, *cmd], work / "cd_train.log")
    ckpt = work / "cd" / "checkpoints" / "best.ckpt"
    secs += run(
        [
            py,
            "export.py",
            f"ckpt_path={ckpt}",
            "postprocess=[whiten_edits,score_norm]",
            "postprocess.whiten.shrinkage=0",  # a trained embedding's whitening needs none
            f"bundle={work}/cd_trained",
            f"hydra.run.dir={work}/e1",
        ],
        work / "cd_export_trained.log",
    )
    model = f"trained: python {' '.join(cmd[:2] + extra)} + export"
    rows.append(score_row(model, work / "cd_trained", secs, work))
    return rows


def table(rows: list[dict], command: str) -> str:
    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.4f}" if key in row else ""

    lines = [
        f"# Retrieval quality on the real-image benchmarks ({datetime.date.today()})",
        "",
        f"Machine: {cpu_model()}. Command: `{command}`.",
        "",
        "| benchmark | model | R@1 | MAP@R | µAP@10 | µAP@10 score-normalised | images/s | "
        "time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['images_per_s']:.1f}" if "images_per_s" in r else ""
        lines.append(
            f"| {r['bench']} | {r['model']} | {cell(r, 'r1')} | {cell(r, 'mapr')} | "
            f"{cell(r, 'uap')} | {cell(r, 'uap_norm')} | {speed} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Our bundles' µAP is what `retrieval score` reports, with the bundle's own search-time "
        "steps (the trained one's include score normalisation); the peers' raw and normalised "
        "µAP are both given. images/s: queries decoded, embedded and searched per second on "
        "the CPU (2 threads).",
    ]
    edits = [r for r in rows if "edits" in r]
    if edits:
        kinds = sorted(edits[0]["edits"])
        lines += ["", "Copy detection, R@1 per edit:", ""]
        lines.append("| model | " + " | ".join(kinds) + " |")
        lines.append("|---|" + "---:|" * len(kinds))
        for r in edits:
            values = " | ".join(f"{r['edits'][k]:.3f}" for k in kinds)
            lines.append(f"| {r['model']} | {values} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part", nargs="+", choices=["emoji", "copydetect", "sscd", "all"], default=["all"]
    )
    parser.add_argument(
        "--trained-bundle", type=Path, help="score this copy-detection bundle instead of training"
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for train.py")
    parser.add_argument("--out", type=Path, help="markdown file (default experiments/...)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_quality-"))
    rows: list[dict] = []
    if {"emoji", "all"} & set(args.part):
        rows += emoji(work, args.set)
    if {"copydetect", "all"} & set(args.part):
        rows += copydetect(work, args.set, args.trained_bundle)
    if {"sscd", "all"} & set(args.part):
        rows += sscd(work)
    out = args.out or ROOT / "experiments" / f"{datetime.date.today()}_bench_quality_cpu.md"
    text = table(rows, "python scripts/bench_quality.py " + " ".join(sys.argv[1:]))
    out.write_text(text)
    print(text, f"written to {out}; logs in {work}", sep="\n")


if __name__ == "__main__":
    main()
