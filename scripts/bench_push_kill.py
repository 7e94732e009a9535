"""Push-kill loop: ``retrieval push`` into Milvus Lite killed with SIGKILL, then recovered.

Each round builds a fresh Milvus Lite folder and a small generated bundle (manifest.json and
items.sqlite of random unit vectors, no model: ``retrieval push`` reads only these), pushes
it, then does what a live deployment does between two pushes: adds items and deletes bundle
items through the engine (as ``retrieval serve --backend`` does), adds items to the bundle
and removes some from it. Then ``retrieval push`` runs in a subprocess and is killed with
SIGKILL either at a random time (uniform over 1.1 times the length of the latest unkilled
push of the same shape, so it covers the index write at the end) or as soon as a new index
file appears in the Milvus Lite folder (the engine writing an index sidecar). After each kill the
one documented recovery command runs: ``retrieval push BUNDLE TARGET --repair``. Then the
collection is opened as ``retrieval serve --backend`` opens it and counted: every expected
item (the bundle's active items, less those deleted through the engine, plus those added
through it) present exactly once, nothing else, no image hash twice, and each of a sample
found first by its own vector (``MilvusBackend.verify``).

    python scripts/bench_push_kill.py               # 24 kills: 12 random, 12 at an index write
    python scripts/bench_push_kill.py --kills 4 --items 500   # a quick check of the logic
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from _machine import cpu_model  # noqa: E402

from retrieval.backends import parse_backend  # noqa: E402
from retrieval.backends.milvus import MilvusBackend  # noqa: E402
from retrieval.bundle.item_table import ItemTable  # noqa: E402
from retrieval.bundle.records import ItemRecord  # noqa: E402

DIM = 64
PUSH = [sys.executable, "-m", "retrieval.cli", "push"]
RECOVERY = "--repair"  # the README's recovery after a crash: retrieval push BUNDLE TARGET --repair


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def records(rng: np.random.Generator, count: int, tag: str) -> tuple[list[ItemRecord], np.ndarray]:
    """``count`` items with distinct image hashes and random unit vectors."""
    x = rng.standard_normal((count, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recs = [
        ItemRecord(
            f"/bench/{tag}/{i}.jpg",
            f"label{i % 10}",
            {"n": i},
            hashlib.sha256(f"{tag}/{i}/{rng.integers(1 << 62)}".encode()).hexdigest(),
        )
        for i in range(count)
    ]
    return recs, x


def make_bundle(folder: Path, rng: np.random.Generator, count: int) -> None:
    """A bundle folder with what ``retrieval push`` reads: manifest.json and items.sqlite."""
    folder.mkdir(parents=True)
    manifest = {
        "format": "retrieval-bundle",
        "format_version": 1,
        "embedding_dim": DIM,
        "metric": "ip",
        "index": {"factory": "Flat"},
        "files": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with ItemTable.create(folder / "items.sqlite", DIM) as store:
        store.add(*records(rng, count, "seed"))


@dataclass
class Round:
    """One round: how the push was killed, what the recovery did, what was counted."""

    mode: str
    killed: bool = False
    kill_at_s: float = 0.0
    index_files_torn: int = 0
    recovery_rc: int = -1
    recovery_out: str = ""
    recovery_stderr_lines: int = 0
    expected: int = 0
    found: int = 0
    missing: int = 0
    extra: int = 0
    twice: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.recovery_rc == 0 and not (self.missing or self.extra or self.twice)


def push(bundle: Path, target: str, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    """``retrieval push BUNDLE TARGET --quiet FLAGS`` run to its end."""
    command = [*PUSH, str(bundle), target, "--quiet", *flags]
    return subprocess.run(command, cwd=ROOT, check=check, capture_output=True, text=True)


def index_files(lite: Path) -> set[Path]:
    """The index sidecars Milvus Lite has written for both collections."""
    return set(lite.glob("collections/*/partitions/*/indexes/*.idx"))


def torn_index_files(lite: Path) -> int:
    """Index sidecars that cannot be read back (the damage a kill at an index write leaves):
    faiss files for the items' HNSW index, NumPy files for the removal record's FLAT one."""
    import faiss

    torn = 0
    for path in index_files(lite):
        try:
            if ".flat." in path.name:
                with open(path, "rb") as handle:
                    np.load(handle)
            else:
                faiss.read_index(str(path))
        except (RuntimeError, ValueError, OSError, EOFError):
            torn += 1
    return torn


def new_index_file(folders: list[Path], before: set[str]) -> bool:
    """Whether a sidecar not in ``before`` has appeared (one listing per folder: fast)."""
    for folder in folders:
        try:
            if set(os.listdir(folder)) - before:
                return True
        except FileNotFoundError:
            pass
    return False


def killed_push(
    bundle: Path, target: str, lite: Path, mode: str, delay: float
) -> tuple[bool, float]:
    """Start ``retrieval push`` and SIGKILL it: after ``delay`` s (random mode) or as soon as
    a new index file appears (index mode). Whether it was killed, and when (or how long it
    ran when it finished first)."""
    folders = sorted({path.parent for path in index_files(lite)})
    before = {name for folder in folders for name in os.listdir(folder)}
    start = time.monotonic()
    push = subprocess.Popen(
        [*PUSH, str(bundle), target, "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while push.poll() is None:
        now = time.monotonic() - start
        due = now >= delay if mode == "random" else new_index_file(folders, before)
        if due:
            os.kill(push.pid, signal.SIGKILL)
            push.wait()
            return True, now
        time.sleep(0.0002)
    return False, time.monotonic() - start


def engine_changes(target: str, rng: np.random.Generator, bundle_ids: list[int]) -> set[int]:
    """Add 5 items and delete 5 bundle items through the engine (as ``serve --backend``);
    the ids that should now be there from the engine's side: added minus deleted."""
    with MilvusBackend.connect(parse_backend(target), DIM) as backend:
        added = backend.add(*records(rng, 5, "engine")).added
        deleted = [int(i) for i in rng.choice(bundle_ids, 5, replace=False)]
        backend.remove(deleted)
    return set(added) | {-i for i in deleted}


def change_bundle(bundle: Path, rng: np.random.Generator, grow: int) -> list[int]:
    """Add ``grow`` items to the bundle and remove 5 of its first items; its active ids."""
    with ItemTable.open(bundle / "items.sqlite") as store:
        store.add(*records(rng, grow, "grown"))
        store.remove([int(i) for i in rng.choice(np.arange(1, 101), 5, replace=False)])
        return [int(i) for i in store.active_ids()]


def count(target: str, expected: set[int], result: Round) -> None:
    """Open the collection as ``serve --backend`` does and count its items."""
    try:
        with MilvusBackend.connect(parse_backend(target), DIM, read_only=True) as backend:
            rows = backend._client.query(
                backend.spec.collection,
                filter="id >= 0",
                output_fields=["id", "content_sha256"],
                limit=16_384,
                consistency_level="Strong",
            )
            result.problems += backend.verify()
    except Exception as err:  # the point is to see every way it can fail
        result.problems.append(f"cannot open: {str(err).splitlines()[0][:200]}")
        return
    ids = collections.Counter(int(r["id"]) for r in rows)
    shas = collections.Counter(r["content_sha256"] for r in rows)
    result.expected, result.found = len(expected), len(rows)
    result.missing = len(expected - set(ids))
    result.extra = len(set(ids) - expected)
    result.twice = sum(1 for c in ids.values() if c > 1) + sum(1 for c in shas.values() if c > 1)


def one_round(work: Path, rng: np.random.Generator, mode: str, delay: float, args) -> Round:
    """Seed push, engine and bundle changes, a killed push, the recovery push, the count."""
    shutil.rmtree(work, ignore_errors=True)
    bundle, lite = work / "bundle", work / "lite"
    target = f"milvus-lite:{lite}"
    make_bundle(bundle, rng, args.items)
    push(bundle, target)
    engine = engine_changes(target, rng, list(range(101, args.items + 1)))
    active = change_bundle(bundle, rng, args.grow)
    expected = (set(active) - {-i for i in engine if i < 0}) | {i for i in engine if i > 0}
    result = Round(mode)
    result.killed, result.kill_at_s = killed_push(bundle, target, lite, mode, delay)
    result.index_files_torn = torn_index_files(lite)
    recovery = push(bundle, target, RECOVERY, check=False)
    result.recovery_rc = recovery.returncode
    out = (recovery.stdout.strip() + "\n" + recovery.stderr.strip()).strip().splitlines()
    result.recovery_out = " / ".join(line[:150] for line in out)
    result.recovery_stderr_lines = len(recovery.stderr.strip().splitlines())
    count(target, expected, result)
    return result


def unkilled_push_time(work: Path, rng: np.random.Generator, args) -> float:
    """How long a push of the round's shape takes when nothing kills it."""
    shutil.rmtree(work, ignore_errors=True)
    bundle, target = work / "bundle", f"milvus-lite:{work / 'lite'}"
    make_bundle(bundle, rng, args.items)
    push(bundle, target)
    change_bundle(bundle, rng, args.grow)
    start = time.monotonic()
    push(bundle, target)
    return time.monotonic() - start


def report(rounds: list[Round], args, wall: float, push_s: float) -> str:
    killed = [r for r in rounds if r.killed]
    lines = [
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"pymilvus {version('pymilvus')}, milvus-lite {version('milvus-lite')}",
        f"- command: `python scripts/bench_push_kill.py --kills {args.kills} --items {args.items} "
        f"--grow {args.grow} --seed {args.seed}`; recovery after each kill: `retrieval push "
        f"BUNDLE milvus-lite:PATH {RECOVERY}`",
        f"- an unkilled push of the round's shape: {push_s:.2f} s; wall time {wall / 60:.1f} min",
        f"- kills: {len(killed)} ({sum(r.mode == 'random' for r in killed)} random, "
        f"{sum(r.mode == 'index' for r in killed)} at a new index file); pushes that finished "
        f"before their kill time: {len(rounds) - len(killed)}",
        f"- kills that left a torn index file: {sum(r.index_files_torn > 0 for r in killed)}",
        f"- recoveries that exited 0: {sum(r.recovery_rc == 0 for r in killed)} of {len(killed)}",
        f"- rounds with every item exactly once: {sum(r.ok for r in killed)} of {len(killed)}",
        "",
        "| # | kill | at s | torn idx | recovery rc | stderr lines | expected | found | "
        "missing | extra | twice | recovery said |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for n, r in enumerate(killed, 1):
        said = (r.recovery_out + ("; " + "; ".join(r.problems) if r.problems else "")).replace(
            "|", "/"
        )
        lines.append(
            f"| {n} | {r.mode} | {r.kill_at_s:.3f} | {r.index_files_torn} | {r.recovery_rc} | "
            f"{r.recovery_stderr_lines} | {r.expected} | {r.found} | {r.missing} | {r.extra} | "
            f"{r.twice} | {said} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=24, help="half random, half at an index write")
    p.add_argument("--items", type=int, default=1000, help="items of the first push")
    p.add_argument("--grow", type=int, default=3000, help="items the bundle gains before the kill")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng, pick = np.random.default_rng(args.seed), random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="push_kill_") as tmp:
        work = Path(tmp) / "round"
        push_s = unkilled_push_time(work, rng, args)
        log(f"an unkilled push takes {push_s:.2f} s")
        rounds: list[Round] = []
        while sum(r.killed for r in rounds) < args.kills and len(rounds) < 3 * args.kills:
            done = {m: sum(r.killed and r.mode == m for r in rounds) for m in ("random", "index")}
            mode = min(done, key=lambda m: done[m])
            r = one_round(work, rng, mode, pick.uniform(0.0, 1.1 * push_s), args)
            rounds.append(r)
            if not r.killed:  # the machine's pace now: the window follows it
                push_s = r.kill_at_s
            log(
                f"{mode} kill at {r.kill_at_s:.3f} s, torn index files {r.index_files_torn}, "
                f"recovery rc {r.recovery_rc}, every item once: {r.ok}; {r.recovery_out[:160]}"
                f" {r.problems[:2]}"
            )
    print(report(rounds, args, time.monotonic() - started, push_s))


if __name__ == "__main__":
    main()
