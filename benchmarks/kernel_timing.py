"""Time two runtimes, each in a process of its own, in alternating blocks; and the machine line.

``Worker`` starts ``timing_worker.py`` (one runtime per process) and ``time_alternating`` asks
two workers in turn for blocks of timed runs, so both see the same machine load and neither is
timed while the other's thread pool spins (a pause separates the blocks; each block starts with
untimed warm-up runs). Min and median are reported, since on a shared machine the minimum is
the kernel and the median what a user sees.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile")  # fmt: skip
PAUSE_S = 0.2  # between blocks: longer than either runtime's pool spins after a run


class Worker:
    """One ``timing_worker.py`` process running ``kind`` ('ort' or 'tvm')."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        env = dict(os.environ)
        env.pop("TVM_NUM_THREADS", None)  # the loader's default (every usable core) is the point
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "timing_worker.py"), kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.loaded: str | None = None
        self.threads = 0

    def request(self, **message) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker died (exit {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.kind} worker: {reply['error']}")
        return reply

    def load(self, path: Path, input_npy: Path) -> None:
        if self.loaded != str(path):
            self.threads = self.request(op="load", path=str(path), input=str(input_npy))["threads"]
            self.loaded = str(path)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@dataclass
class Timing:
    """Seconds of every timed run of one side."""

    times: list[float]

    @property
    def min_ms(self) -> float:
        return min(self.times) * 1e3

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def time_alternating(
    first: Worker, second: Worker, *, rounds: int, block_s: float, max_runs: int = 400
) -> tuple[Timing, Timing]:
    """Blocks of timed runs, first then second, ``rounds`` times; each block lasts ~``block_s``.

    Both workers must have their case loaded.
    """
    runs = {}
    for worker in (first, second):
        probe = worker.request(op="time", runs=3, warmup=1)["times"]
        runs[worker] = max(2, min(max_runs, int(block_s / max(min(probe), 1e-6))))
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        for worker, out in ((first, a), (second, b)):
            time.sleep(PAUSE_S)
            out += worker.request(op="time", runs=runs[worker], warmup=2)["times"]
    return Timing(a), Timing(b)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def isa_flags() -> list[str]:
    from gconv_compile.targets import cpu_flags

    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def machine_line() -> str:
    """CPU model, ISA flags, usable cores and load average, for every table."""
    load = os.getloadavg()
    return (
        f"{cpu_model()} ({platform.machine()}), ISA flags: {' '.join(isa_flags()) or 'none'}; "
        f"{len(os.sched_getaffinity(0))} usable cores; load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
