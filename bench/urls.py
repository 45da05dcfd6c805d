"""What URL safety costs, and what the deadlines buy: one run, one side-by-side table.

Rows (each against real HTTP servers on this machine, ``testsupport.image_server``):

* download: ``--downloads`` sequential GETs of a small PNG over a pooled connection, with a bare
  ``requests.Session`` (what an unguarded fetcher does) and with ``backend.http_download.Downloader`` (the URL
  parsed and checked at each hop, the deadline watchdog armed, the allow-list applied). Three flavours of the
  latter: a host named in SAM_IMAGE_HOSTS, a name whose addresses are checked at connect time, and a new
  connection per download (the pool dropped after each, so the name is resolved and checked every time).
* dripping host: a host that sends its headers one byte every ``--drip-every`` s; a bare session with a
  per-read timeout of IMAGE_TIMEOUT_S against the Downloader with the same IMAGE_TIMEOUT_S.
* stalled Redis: ``Warmer.submit`` of ``--tasks`` warm-ups (a TASKS_CREATED) while redis-server is SIGSTOPped.
  The unguarded column is not run: without a socket timeout it waits for as long as Redis is stopped.

    .venv/bin/python -m bench.urls
    .venv/bin/python -m bench.urls --downloads 1000 --drip-every 0.05
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests

from backend.http_download import Downloader
from backend.label_studio import LabelStudioClient
from backend.warmup import Warmer, WarmupJob
from testsupport.image_server import CloudStorage
from testsupport.processes import RedisServer


def _times(n: int, call: Callable[[], object]) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def _cell(times: list[float]) -> str:
    times = sorted(times)
    return f"p50 {statistics.median(times) * 1e3:6.2f} ms, p95 {times[int(len(times) * 0.95)] * 1e3:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--downloads", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=2.0, help="IMAGE_TIMEOUT_S for the dripping host")
    parser.add_argument("--drip-every", type=float, default=0.02, help="seconds between header bytes")
    parser.add_argument("--tasks", type=int, default=300)
    args = parser.parse_args()

    cloud = CloudStorage()
    rows: list[tuple[str, str, str]] = []
    try:
        port = cloud.port
        url = f"{cloud.url}/public/rgb.png"
        by_name = f"http://localhost:{port}/public/rgb.png"
        nobody = LabelStudioClient(None, None, http=Downloader(30, 50 * 2**20))

        bare = requests.Session()
        bare.get(url).content  # noqa: B018 - connect once: every row is measured on a pooled connection
        baseline = _times(args.downloads, lambda: bare.get(url, timeout=30).content)

        named = Downloader(30, 50 * 2**20, f"127.0.0.1:{port}")
        named.get(url, nobody, named.deadline())
        rows.append(("download, host named in SAM_IMAGE_HOSTS", _cell(baseline),
                     _cell(_times(args.downloads, lambda: named.get(url, nobody, named.deadline())))))

        checked = Downloader(30, 50 * 2**20, "127.0.0.0/8")  # 'localhost' is checked by its addresses
        checked.get(by_name, nobody, checked.deadline())
        baseline_by_name = _times(args.downloads, lambda: bare.get(by_name, timeout=30).content)
        rows.append(("download, name checked by its addresses", _cell(baseline_by_name),
                     _cell(_times(args.downloads, lambda: checked.get(by_name, nobody, checked.deadline())))))

        fresh = Downloader(30, 50 * 2**20, "127.0.0.0/8")

        def bare_new_connection() -> None:
            bare.get(by_name, timeout=30).content  # noqa: B018
            bare.close()  # drops the pool: the next GET resolves and connects again

        def guarded_new_connection() -> None:
            fresh.get(by_name, nobody, fresh.deadline())
            fresh.session.close()

        rows.append(("download, new connection each (resolve + check)",
                     _cell(_times(args.downloads, bare_new_connection)),
                     _cell(_times(args.downloads, guarded_new_connection))))

        drip = f"{cloud.url}/drip?every={args.drip_every}"
        started = time.perf_counter()
        try:
            requests.get(drip, timeout=args.timeout).content  # noqa: B018
            outcome = "downloaded"
        except requests.RequestException as error:
            outcome = type(error).__name__
        unguarded = f"{time.perf_counter() - started:6.2f} s ({outcome})"
        guard = Downloader(args.timeout, 50 * 2**20, f"127.0.0.1:{port}")
        started = time.perf_counter()
        try:
            guard.get(drip, nobody, guard.deadline())
            outcome = "downloaded"
        except Exception as error:  # the timeout error is the expected outcome
            outcome = type(error).__name__
        rows.append((f"dripping headers, 1 byte / {args.drip_every} s, timeout {args.timeout} s", unguarded,
                     f"{time.perf_counter() - started:6.2f} s ({outcome})"))

        with tempfile.TemporaryDirectory() as workdir:
            redis_server = RedisServer(Path(workdir))
            redis_server.start()
            assert redis_server.process is not None
            try:
                warmer = Warmer(redis_url=redis_server.url, consume=False, max_queue=10_000)
                os.kill(redis_server.process.pid, signal.SIGSTOP)
                jobs = [WarmupJob(task={"id": i, "data": {"image": f"/data/upload/1/{i}.png"}}, value_key="image")
                        for i in range(args.tasks)]
                started = time.perf_counter()
                queued = warmer.submit(jobs)
                took = time.perf_counter() - started
                rows.append((f"TASKS_CREATED of {args.tasks} on a stalled Redis", "waits while Redis is stopped",
                             f"{took:6.2f} s ({queued} queued in process)"))
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
                redis_server.stop()
    finally:
        cloud.close()

    width = max(len(row[0]) for row in rows)
    print(f"{'case':<{width}} | {'unguarded (bare requests / no timeout)':<40} | guarded (this backend)")
    print("-" * (width + 90))
    for case, before, after in rows:
        print(f"{case:<{width}} | {before:<40} | {after}")
    print(f"\nload average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
