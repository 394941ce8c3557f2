"""One runtime in a process of its own, timed on request: the worker of ``kernel_timing.py``.

Run by the driver as ``python benchmarks/timing_worker.py ort|tvm``; it reads one JSON request
per line on stdin and answers one JSON line on stdout:

- ``{"op": "load", "path": MODEL_OR_LIBRARY, "input": NPY}``: load the case (an ONNX file for
  ``ort``, a compiled library for ``tvm``) and its input, run it twice; answers ``{"threads": n}``;
- ``{"op": "time", "runs": k, "warmup": w}``: ``w`` untimed runs, then ``k`` timed ones; answers
  ``{"times": [seconds, ...]}``;
- ``{"op": "save", "out": NPY}``: write the first output (for the error check);
- ``{"op": "quit"}``.

onnxruntime and TVM never share a process: each runtime's thread pool spins for a while after a
run, and in one process that spinning pool steals the cores the other one is timed on (the old
paired harness gave every stage conv a ~3.9 ms floor that way). Both use every usable core:
onnxruntime through ``intra_op_num_threads``, TVM through the product's loader
(``gconv_compile.load``, every usable core by default).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


class OrtCase:
    """An onnxruntime CPU session over one ONNX file (all graph optimisations, as shipped)."""

    def __init__(self, path: str, x: np.ndarray) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = usable_cores()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.feeds = {self.session.get_inputs()[0].name: x}
        self.threads = usable_cores()

    def run(self):
        return self.session.run(None, self.feeds)

    def output(self) -> np.ndarray:
        return self.run()[0]


class TvmCase:
    """A compiled library loaded by the product's loader, its input prepared once (in place)."""

    def __init__(self, path: str, x: np.ndarray) -> None:
        import gconv_compile

        load = getattr(gconv_compile, "load", None)
        if load is None:  # until the top-level name lands, the loader it will export
            from gconv_compile.runtime import load
        self.library = load(path)
        self.threads = self.library.threads
        name = self.library.input_names[0]
        self.args = self.library.prepare({name: x})

    def run(self):
        return self.library.call(self.args)

    def output(self) -> np.ndarray:
        return np.from_dlpack(self.run()[0]).copy()


def serve(kind: str) -> None:
    case = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "quit":
            break
        if op == "load":
            x = np.load(request["input"])
            case = (OrtCase if kind == "ort" else TvmCase)(request["path"], x)
            case.run()
            case.run()
            reply = {"threads": case.threads}
        elif op == "time":
            for _ in range(request.get("warmup", 2)):
                case.run()
            times = []
            for _ in range(request["runs"]):
                start = time.perf_counter()
                case.run()
                times.append(time.perf_counter() - start)
            reply = {"times": times}
        elif op == "save":
            np.save(request["out"], case.output())
            reply = {}
        else:
            reply = {"error": f"unknown op {op!r}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("ort", "tvm"):
        raise SystemExit("usage: timing_worker.py ort|tvm")
    serve(sys.argv[1])
