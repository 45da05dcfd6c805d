"""Does a better malloc make the engine's page-fault workarounds unnecessary? Encoder times per allocator.

Three of the ``FAST`` tricks exist because glibc's malloc hands large freed blocks back to the operating
system, so the next tensor of that size is faulted in afresh (``model.fast_paths``): ``window_bands``,
``mlp_chunk_elements`` and ``in_place_activations``. jemalloc and tcmalloc keep freed memory mapped for
reuse. This script times one image-encoder forward (1024 x 1024, fp32, inference mode) of ViT-B and of
MobileSAM's TinyViT, with seeded random weights, under each allocator (``LD_PRELOAD``), with ``FAST`` and
with each workaround switched off one at a time (and all three at once).

Each allocator runs in its own worker process (the preload must be in place before Python starts); this
process sends the workers one encode at a time, round after round, so every configuration of every
allocator is measured in the same stretch of time: on a shared, noisy machine only these interleaved
ratios mean anything. It prints medians of the CPU time per encode (user + system: page faults are system
time; other processes' load stretches wall time far more than CPU time), of the minor page faults and of
the wall time, the workers' peak RSS and the load average of each round. With ``--threads 1`` the CPU time
holds no OpenMP spin-waiting.

    .venv/bin/python -m bench.allocator                       # both models, 5 rounds
    .venv/bin/python -m bench.allocator --models vit_b --runs 3 --threads 1

jemalloc: ``apt-get install libjemalloc2``; tcmalloc: ``apt-get install libtcmalloc-minimal4`` (or the
``JEMALLOC_PATH`` / ``TCMALLOC_PATH`` of a library elsewhere). A missing library is reported and skipped. Besides the three allocators as installed, two configurations
(``ALLOCATORS``) that never give freed memory back to the operating system: jemalloc without its purging
decay, and glibc's own malloc without mmap'd blocks or trimming (no new library). TinyViT has no banded attention and no ``MLPBlock``, so for ``vit_t``
only the in-place activations are switched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from testsupport.paths import REPO_ROOT

# Where Debian installs them; JEMALLOC_PATH / TCMALLOC_PATH name a copy elsewhere (e.g. unpacked with dpkg -x).
JEMALLOC = os.environ.get("JEMALLOC_PATH", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
TCMALLOC = os.environ.get("TCMALLOC_PATH", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
# Name -> (library to preload or None, environment variables). The environment variables of every entry
# are removed from the workers' environment first, so each worker runs exactly its own configuration.
ALLOCATORS: dict[str, tuple[str | None, dict[str, str]]] = {
    "glibc": (None, {}),
    "jemalloc": (JEMALLOC, {}),
    # jemalloc purges freed pages back to the OS over a 10 s decay, faster than encodes reuse them (it
    # faulted in more pages per encode than glibc); with the decay off, freed pages stay for reuse.
    "jemalloc-retain": (JEMALLOC, {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    "tcmalloc": (TCMALLOC, {}),
    # glibc without a new library: never mmap a block of its own (those go back to the OS on free) and
    # never trim the heap's top, so freed memory stays mapped for reuse.
    "glibc-tuned": (None, {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}),
}
# Label -> FastPaths fields changed from FAST.
POLICIES = {
    "FAST": {},
    "no window bands": {"window_bands": False},
    "no MLP chunks": {"mlp_chunk_elements": 0},
    "no in-place activations": {"in_place_activations": False},
    "none of the three": {"window_bands": False, "mlp_chunk_elements": 0, "in_place_activations": False},
}
MODEL_POLICIES = {
    "vit_b": list(POLICIES),
    "vit_t": ["FAST", "no in-place activations"],
}
SIZE = 1024
_T = TypeVar("_T")


# --- worker: one allocator, encodes on request --------------------------------------------------------------


def random_encoder(name: str, seed: int = 0):  # noqa: ANN201 (torch is imported in the worker only)
    """Our image encoder of ``name`` in its official configuration, every parameter seeded random."""
    import torch

    from model.checkpoint import OFFICIAL_VITS
    from model.image_encoder import ImageEncoderViT
    from model.tiny_vit import MOBILE_SAM_VIT_T, TinyViT

    if name == "vit_t":
        encoder = TinyViT(**MOBILE_SAM_VIT_T)
    else:
        dim, depth, heads, global_blocks = OFFICIAL_VITS[name]
        encoder = ImageEncoderViT(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=global_blocks)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in encoder.parameters():
            fan_in = max(1, param[0].numel()) if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return encoder.eval()


def preloaded() -> str:
    """The library serving this process's malloc: a file name, or "glibc"."""
    maps = Path("/proc/self/maps").read_text()
    for library in (JEMALLOC, TCMALLOC):
        if Path(library).name.split(".so")[0] in maps:
            return library
    return "glibc"


def worker(models: list[str], threads: int) -> None:
    """Answer ``{"model", "policy"}`` lines on stdin with the wall ms, CPU ms and page faults of one encode."""
    import torch

    from model.fast_paths import FAST, apply

    if threads:
        torch.set_num_threads(threads)
    encoders = {name: random_encoder(name) for name in models}
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for encoder in encoders.values():  # warm-up
            encoder(x)
    print(json.dumps({"library": preloaded(), "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        encoder = encoders[request["model"]]
        apply(encoder, replace(FAST, **POLICIES[request["policy"]]), "cpu")
        before = resource.getrusage(resource.RUSAGE_SELF)
        with torch.inference_mode():
            start = time.perf_counter()
            encoder(x)
            wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(json.dumps({"wall_ms": 1000 * wall, "cpu_ms": 1000 * cpu, "sys_ms": 1000 * (after.ru_stime - before.ru_stime),
                          "faults": after.ru_minflt - before.ru_minflt}), flush=True)
    print(json.dumps({"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


# --- coordinator --------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, allocator: str, models: list[str], threads: int) -> None:
        library, variables = ALLOCATORS[allocator]
        ours = {"LD_PRELOAD"}.union(*(v for _, v in ALLOCATORS.values()))
        env = {k: v for k, v in os.environ.items() if k not in ours}
        env.update(variables)
        if library:
            env["LD_PRELOAD"] = library
        self.allocator = allocator
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.allocator", "--worker", "--models", ",".join(models), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        hello = self.read()
        if hello["library"] != (library or "glibc"):
            raise SystemExit(f"the {allocator} worker runs {hello['library']}: LD_PRELOAD={library} did not load")
        self.threads = hello["threads"]

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.allocator} worker exited (code {self.process.wait()})")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> float:
        """Stop the worker; its peak RSS in MiB."""
        rss = self.ask({"quit": True})["max_rss_mib"]
        self.process.wait(timeout=60)
        return rss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_b,vit_t", help="comma-separated: vit_b,vit_t (also vit_l, vit_h)")
    parser.add_argument("--runs", type=int, default=5, help="rounds: timed encodes per model, policy and allocator")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = PyTorch's default)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS),
                        help=f"comma-separated, the first is the baseline: {','.join(ALLOCATORS)}")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.worker:
        worker(models, args.threads)
        return
    for name in models:
        MODEL_POLICIES.setdefault(name, list(POLICIES))

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    workers = []
    for allocator in (a.strip() for a in args.allocators.split(",") if a.strip()):
        if allocator not in ALLOCATORS:
            parser.error(f"unknown allocator {allocator!r}; choose from {', '.join(ALLOCATORS)}")
        library = ALLOCATORS[allocator][0]
        if library and not Path(library).exists():
            log(f"{allocator}: {library} is not installed, skipped")
            continue
        log(f"{allocator}: starting a worker (building {', '.join(models)} and one warm-up encode each)")
        workers.append(Worker(allocator, models, args.threads))
    samples: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    loads = []
    for run in range(args.runs):
        loads.append(os.getloadavg()[0])
        log(f"round {run + 1}/{args.runs}, load average {loads[-1]:.2f}")
        # Rotate the allocators' and the policies' order each round: none is always first after another's
        # encode, and a load that rises or falls during the run does not favour the policies timed last.
        order = rotated(workers, run)
        for name in models:
            for label in rotated(MODEL_POLICIES[name], run):
                for w in order:
                    samples.setdefault((name, label, w.allocator), []).append(
                        w.ask({"model": name, "policy": label}))
    loads.append(os.getloadavg()[0])
    rss = {w.allocator: w.close() for w in workers}
    print(report(samples, [w.allocator for w in workers], models, rss, loads, workers[0].threads))


def rotated(items: list[_T], by: int) -> list[_T]:
    return items[by % len(items):] + items[:by % len(items)]


def median(samples: dict[tuple[str, str, str], list[dict[str, float]]], key: tuple[str, str, str],
           metric: str) -> float:
    return statistics.median(sample[metric] for sample in samples[key])


def report(samples: dict[tuple[str, str, str], list[dict[str, float]]], allocators: list[str], models: list[str],
           rss: dict[str, float], loads: list[float], threads: int) -> str:
    """The tables: CPU time (what load from other processes disturbs least), its ratios, wall time."""
    lines = [f"torch threads {threads}, {os.cpu_count()} cores, {len(samples[next(iter(samples))])} rounds, "
             f"load average per round {', '.join(f'{v:.2f}' for v in loads)}", ""]
    for allocator in allocators:
        library, variables = ALLOCATORS[allocator]
        settings = [f"LD_PRELOAD={library}"] * bool(library) + [f"{k}={v}" for k, v in variables.items()]
        lines.append(f"- {allocator}: {' '.join(settings) or 'as installed, nothing preloaded'}")
    header = ["| model | policy | " + " | ".join(allocators) + " |", "|---|---|" + "---:|" * len(allocators)]

    def table(title: str, cell) -> None:  # noqa: ANN001
        lines.extend(["", title, "", *header])
        for name in models:
            for label in MODEL_POLICIES[name]:
                cells = [cell(name, label, allocator) for allocator in allocators]
                if all(cells):
                    lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")

    def cpu(name: str, label: str, allocator: str) -> str:
        ms = median(samples, (name, label, allocator), "cpu_ms")
        baseline = median(samples, (name, "FAST", allocators[0]), "cpu_ms")
        return (f"{ms:.0f} ({ms / baseline:.2f}x, sys {median(samples, (name, label, allocator), 'sys_ms'):.0f}, "
                f"{median(samples, (name, label, allocator), 'faults') / 1000:.0f}k faults)")

    def cost(name: str, label: str, allocator: str) -> str:
        if label == "FAST":
            return ""
        off = median(samples, (name, label, allocator), "cpu_ms")
        return f"{off / median(samples, (name, 'FAST', allocator), 'cpu_ms'):.2f}x"

    def wall(name: str, label: str, allocator: str) -> str:
        ms = median(samples, (name, label, allocator), "wall_ms")
        return f"{ms:.0f} ({ms / median(samples, (name, 'FAST', allocators[0]), 'wall_ms'):.2f}x)"

    table(f"CPU ms per encode, user + system (median; in brackets: ratio to {allocators[0]} FAST of the same "
          f"model, system ms, minor page faults):", cpu)
    table("Cost of switching a workaround off, under the same allocator (CPU ms / CPU ms of FAST):", cost)
    table(f"Wall ms per encode (median; ratio to {allocators[0]} FAST), disturbed by other processes' load:", wall)
    lines.extend(["", "Peak RSS of each worker (all models, every policy): "
                  + ", ".join(f"{a} {v:.0f} MiB" for a, v in rss.items())])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
