"""The service's parts on their own: micro-batching, the expiring cache, statistics, settings,
format sniffing and the upload folder."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.service.guard import ServiceStats
from retrieval.service.item_images import UploadFolder, sniff_image
from retrieval.service.search_service import ExpiringCache, MicroBatcher
from retrieval.service.settings import TOKEN_ENV, ServiceSettings


class SlowModel:
    """Doubles its input after a fixed delay, recording each call's batch size."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay, self.calls, self.threads = delay, [], set()

    def __call__(self, batch: list[np.ndarray]) -> np.ndarray:
        self.calls.append(len(batch))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)
        return np.stack(batch) * 2.0


def test_concurrent_queries_share_model_calls_and_get_their_own_rows() -> None:
    model = SlowModel()
    sizes: list[int] = []
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.005, on_batch=sizes.append)

    async def main() -> list[np.ndarray]:
        queries = [np.full(3, i, np.float32) for i in range(20)]
        try:
            return await asyncio.gather(*(batcher.embed(q) for q in queries))
        finally:
            await batcher.aclose()

    results = asyncio.run(main())
    for i, row in enumerate(results):
        np.testing.assert_array_equal(row, np.full(3, 2 * i, np.float32))
    assert sum(model.calls) == 20 and max(model.calls) <= 8
    assert len(model.calls) <= 4, model.calls  # 20 queries in ~3 calls, not 20
    assert sizes == model.calls and len(model.threads) == 1


def test_a_lone_query_is_not_held_back() -> None:
    model = SlowModel(delay=0.0)
    batcher = MicroBatcher(model, max_batch=16, max_wait_s=0.002)

    async def main() -> float:
        start = time.perf_counter()
        await batcher.embed(np.zeros(2, np.float32))
        took = time.perf_counter() - start
        await batcher.aclose()
        return took

    assert asyncio.run(main()) < 0.5 and model.calls == [1]


def test_a_query_past_its_deadline_is_dropped_before_the_model_runs() -> None:
    from retrieval.service.budget import DeadlineExceeded

    model = SlowModel(delay=0.2)
    batcher = MicroBatcher(model, max_batch=8, max_wait_s=0.0)

    async def main() -> list[object]:
        first = asyncio.ensure_future(batcher.embed(np.zeros(2, np.float32)))
        await asyncio.sleep(0.05)  # the model is busy with the first query
        soon = time.monotonic() + 0.05  # passes while it waits
        late = [batcher.embed(np.ones(2, np.float32), deadline=soon) for _ in range(3)]
        on_time = batcher.embed(np.ones(2, np.float32), deadline=time.monotonic() + 5)
        results = await asyncio.gather(first, *late, on_time, return_exceptions=True)
        await batcher.aclose()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, DeadlineExceeded) for r in results[1:4])
    np.testing.assert_array_equal(results[4], np.full(2, 2.0))
    assert model.calls == [1, 1]  # the late ones never reached the model


def test_a_lane_bounds_running_and_waiting_jobs() -> None:
    from retrieval.service.budget import Busy, Deadline, DeadlineExceeded, Lane

    lane = Lane("test", slots=2, queue=1)
    running: list[int] = []
    peak: list[int] = []
    lock = threading.Lock()

    def job(delay: float) -> float:
        with lock:
            running.append(1)
            peak.append(len(running))
        time.sleep(delay)
        with lock:
            running.pop()
        return delay

    async def main() -> list[object]:
        long = Deadline.after(10.0)
        jobs = [asyncio.ensure_future(lane.run(lambda: job(0.3), long)) for _ in range(3)]
        await asyncio.sleep(0.05)  # two run, one waits
        assert lane.snapshot()["running"] == 2 and lane.snapshot()["waiting"] == 1
        with pytest.raises(Busy) as busy:
            await lane.run(lambda: job(0.0), long)
        assert busy.value.retry_after >= 1
        done = await asyncio.gather(*jobs)
        # A job still waiting at its deadline gives up; the slot goes to the next one.
        blockers = [asyncio.ensure_future(lane.run(lambda: job(0.4), long)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded, match="waiting for a decode slot"):
            await lane.run(lambda: job(0.0), Deadline.after(0.1))
        await asyncio.gather(*blockers)
        # A job whose request is cancelled mid-run keeps its slot until the thread ends.
        task = asyncio.ensure_future(lane.run(lambda: job(0.3), long))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert lane.busy == 1
        await asyncio.sleep(0.4)
        assert lane.busy == 0 and lane.snapshot()["waiting"] == 0
        return [*done, await lane.run(lambda: job(0.0), long)]

    assert asyncio.run(main()) == [0.3, 0.3, 0.3, 0.0]
    assert max(peak) == 2 and lane.refused == 1


def test_default_decode_slots_come_from_cores_and_memory() -> None:
    from retrieval.service.budget import WORST_BYTES_PER_PIXEL, default_decode_slots

    worst = WORST_BYTES_PER_PIXEL * 40_000_000
    assert default_decode_slots(40_000_000, 10 * worst, cores=4) == 4
    assert default_decode_slots(40_000_000, 3 * worst, cores=16) == 3
    assert default_decode_slots(40_000_000, worst // 2, cores=16) == 1
    settings = ServiceSettings(decode_memory_mb=1024, max_pixels=40_000_000)
    assert settings.large_decode_slots() == min(os.cpu_count() or 1, 3)
    assert ServiceSettings(decode_slots=5).large_decode_slots() == 5


def test_a_model_failure_reaches_every_query_of_its_batch_and_the_next_batch_works() -> None:
    calls = []

    def flaky(batch: list[np.ndarray]) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("model broke")
        return np.stack(batch)

    batcher = MicroBatcher(flaky, max_batch=4, max_wait_s=0.01)

    async def main() -> tuple[list[object], np.ndarray]:
        first = await asyncio.gather(
            *(batcher.embed(np.ones(2, np.float32)) for _ in range(3)), return_exceptions=True
        )
        after = await batcher.embed(np.ones(2, np.float32))
        await batcher.aclose()
        return first, after

    first, after = asyncio.run(main())
    assert all(isinstance(e, RuntimeError) and "model broke" in str(e) for e in first)
    np.testing.assert_array_equal(after, np.ones(2))
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(flaky, max_batch=0)


def test_expiring_cache_evicts_oldest_and_expires() -> None:
    now = [0.0]
    cache: ExpiringCache[int] = ExpiringCache(size=2, ttl_s=10.0, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    now[0] = 10.5
    assert cache.get("a") is None and cache.get("c") is None and len(cache) == 0
    off: ExpiringCache[int] = ExpiringCache(size=0, ttl_s=10.0)
    off.put("a", 1)
    assert off.get("a") is None


def test_stats_percentiles_and_counts() -> None:
    stats = ServiceStats()
    latencies = np.linspace(0.001, 0.100, 100)
    for i, seconds in enumerate(latencies):
        stats.record("/search", 200 if i % 10 else 422, float(seconds))
    stats.record_batch(3)
    stats.record_batch(1)
    stats.record_cache(True)
    snap = stats.snapshot()
    route = snap["routes"]["/search"]
    assert route["requests"] == 100 and route["by_status"] == {"200": 90, "422": 10}
    expected = np.percentile(latencies * 1000, [50, 90, 99])
    got = [route["latency_ms"][p] for p in ("p50", "p90", "p99")]
    np.testing.assert_allclose(got, expected, atol=0.01)
    assert snap["batching"] == {"batches": 2, "queries": 4, "mean_batch": 2.0}
    assert snap["cache"] == {"hits": 1, "misses": 0} and snap["requests"] == 100


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("max_body_bytes", 0, "positive"),
        ("max_k", -1, "positive"),
        ("batch_size", True, "positive"),
        ("batch_wait_ms", -1.0, ">= 0"),
        ("token", "short", "8 characters"),
        ("decode_slots", 0, "positive"),
        ("decode_queue", -1, ">= 0"),
        ("max_requests", 0, "positive"),
    ],
)
def test_settings_are_checked(field: str, value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ServiceSettings(**{field: value})  # type: ignore[arg-type]


def test_token_from_the_command_line_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    assert ServiceSettings.token_from(None) == "from-the-environment"
    assert ServiceSettings.token_from("from-the-command-line") == "from-the-command-line"
    monkeypatch.delenv(TOKEN_ENV)
    assert ServiceSettings.token_from(None) is None


@pytest.mark.parametrize(
    ("data", "extension"),
    [
        (b"\xff\xd8\xff\xe0rest", ".jpg"),
        (b"\x89PNG\r\n\x1a\nrest", ".png"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", ".webp"),
        (b"GIF89a...", ".gif"),
        (b"BM....", ".bmp"),
        (b"II*\x00....", ".tif"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", None),
        (b"%PDF-1.7", None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"", None),
    ],
)
def test_formats_are_judged_by_their_bytes(data: bytes, extension: str | None) -> None:
    assert sniff_image(data) == extension


def test_upload_folder_names_files_by_content_and_deletes_only_its_own(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path / "uploads")
    path, created = folder.store(b"\xff\xd8\xffdata", ".jpg")
    assert created and path.parent == tmp_path / "uploads" and len(path.stem) == 64
    assert folder.store(b"\xff\xd8\xffdata", ".jpg") == (path, False)
    outside = tmp_path / "gallery.jpg"
    outside.write_bytes(b"keep me")
    folder.discard(str(outside))
    folder.discard(str(tmp_path / "uploads" / ".." / "gallery.jpg"))
    assert outside.read_bytes() == b"keep me"
    folder.discard(str(path))
    assert not path.exists()


def test_sweep_moves_unreferenced_files_and_deletes_temp_files(tmp_path: Path) -> None:
    folder = UploadFolder(tmp_path / "uploads")
    assert folder.sweep(lambda p: False) == ([], [])  # no folder yet
    used, _ = folder.store(b"\xff\xd8\xffused", ".jpg")
    orphan, _ = folder.store(b"\x89PNG\r\n\x1a\norphan", ".png")
    temp = folder.root / f".{orphan.name}.abc123.tmp"
    temp.write_bytes(b"half")
    foreign = folder.root / "README.txt"
    foreign.write_text("not ours")
    moved, deleted = folder.sweep(lambda p: p == used)
    assert moved == [orphan] and deleted == [temp]
    assert (folder.orphans / orphan.name).is_file() and used.is_file() and foreign.is_file()
    assert folder.sweep(lambda p: p == used) == ([], [])
