"""Run the gconv-compile CLI while sampling resident memory per phase.

Usage: ``python tests/memory_phases.py optimize IN.onnx -o OUT.onnx`` (any CLI arguments).

The CLI runs in this process; a thread samples ``/proc/self/status`` every 20 ms and keeps, for
each phase (load, reference run, rewrite, check, save), the sample with the highest RSS, split
into anonymous memory (heap: arrays the passes build) and file-backed memory (weights that
onnx-ir or onnxruntime memory-map). On exit it prints one JSON line to stderr::

    MEMORY-PHASES {"load_model": {"rss": ..., "anon": ..., "file": ...}, ...}

Used by tests/test_large_model.py; phases whose functions are renamed are simply not tagged.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time

MARKER = "MEMORY-PHASES"
HWM_MARKER = "MEMORY-HWM"

_phase = ["between phases"]
_peaks: dict[str, dict[str, int]] = {}
_lock = threading.Lock()


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return {"rss": values["VmRSS"], "anon": values["RssAnon"], "file": values["RssFile"]}


def _high_water_mark() -> int:
    """This process's peak RSS since exec (VmHWM). Unlike wait4's ru_maxrss it does not
    include the parent's memory, which a vfork()ed child is charged before it execs."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _sample() -> None:
    with _lock:
        now = _status()
        best = _peaks.get(_phase[0])
        if best is None or now["rss"] > best["rss"]:
            _peaks[_phase[0]] = now


def _sampler() -> None:
    while True:
        _sample()
        time.sleep(0.02)


def _tag(owner, name: str, label: str) -> None:
    function = getattr(owner, name, None)
    if function is None:
        return

    @functools.wraps(function)
    def tagged(*args, **kwargs):
        _sample()
        outer = _phase[0]
        _phase[0] = label
        try:
            return function(*args, **kwargs)
        finally:
            _sample()
            _phase[0] = outer

    setattr(owner, name, tagged)


def main(argv: list[str]) -> int:
    threading.Thread(target=_sampler, daemon=True).start()
    from gconv_compile import cli, model_io, reference, targets

    # cli binds load_model/save_model by name, so they are tagged where it looks them up too.
    for owner in (model_io, cli):
        _tag(owner, "load_model", "load_model")
        _tag(owner, "save_model", "save_model")
    _tag(reference.ReferenceRun, "__init__", "reference run (input)")
    _tag(reference.ReferenceRun, "check", "check run (output)")
    _tag(targets.PassPlan, "__call__", "rewrite")
    code = 3
    try:
        code = cli.main(argv)
    finally:
        _sample()
        print(f"{MARKER} {json.dumps(_peaks)}", file=sys.stderr, flush=True)
        print(f"{HWM_MARKER} {_high_water_mark()}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
