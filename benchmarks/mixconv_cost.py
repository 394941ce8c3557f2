"""Does the MixConv fold pay? Measured time of the folded block against the branches.

Run: ``python benchmarks/mixconv_cost.py [--repeat 7]``. For MixConv blocks (depthwise kernels
3/5/7, 3x3 with dilations 1/2/3, ...) at several sizes, prints the time of the branchy block and
of the block folded with ``mixconv="always"`` in onnxruntime (CPU EP, graph optimisations off,
one thread: the fold's extra multiply-adds against the launches and copies it saves), their
ratio, the pass's estimate (``passes/_fold_cost.py``) and what ``mixconv="auto"`` decides with
the llvm profile's prices. Each model is timed in a process of its own (``--one`` runs one), best
of ``--repeat`` rounds, with the rounds of the two models alternated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from gconv_compile.passes import FoldSplitConvConcat
from onnx import TensorProto, helper, numpy_helper

CASES = [  # channels, size, kernels, dilations
    (96, 56, (3, 5, 7), (1, 1, 1)),
    (96, 56, (3, 3, 3), (1, 2, 3)),
    (96, 28, (3, 5), (1, 1)),
    (96, 28, (3, 5, 7), (1, 1, 1)),
    (48, 16, (3, 5, 7), (1, 1, 1)),
    (48, 16, (3, 3, 3), (1, 2, 3)),
]


def mixconv_block(channels: int, size: int, kernels, dilations) -> onnx.ModelProto:
    """Split -> one depthwise Conv per kernel ('same' padding) -> Concat, seeded weights."""
    n, rng = len(kernels), np.random.default_rng(0)
    per = channels // n
    nodes = [helper.make_node("Split", ["X", "sizes"], [f"x{i}" for i in range(n)], axis=1)]
    inits = [numpy_helper.from_array(np.full(n, per, np.int64), "sizes")]
    for i, (k, d) in enumerate(zip(kernels, dilations)):
        weight = rng.standard_normal((per, 1, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        pad = d * (k - 1) // 2
        nodes.append(helper.make_node(
            "Conv", [f"x{i}", f"w{i}"], [f"y{i}"], group=per, pads=[pad] * 4,
            dilations=[d, d], kernel_shape=[k, k],
        ))  # fmt: skip
    nodes.append(helper.make_node("Concat", [f"y{i}" for i in range(n)], ["Y"], axis=1))
    graph = helper.make_graph(
        nodes, "mixconv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def fold(model: onnx.ModelProto, mixconv: str) -> tuple[onnx.ModelProto, FoldSplitConvConcat]:
    loaded = ir.serde.deserialize_model(model)
    fold_pass = FoldSplitConvConcat(mixconv=mixconv)
    fold_pass(loaded)
    return ir.serde.serialize_model(loaded), fold_pass


def time_one(path: str, rounds: int) -> float:
    """Best seconds per run of the model at ``path`` (runs in the calling process)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    reps = 20 if shape[-1] > 30 else 300
    for _ in range(5):
        session.run(None, {"X": x})
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            session.run(None, {"X": x})
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def in_own_process(path: Path, rounds: int) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--one", str(path), "--repeat", str(rounds)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(done.stdout.strip())


def measure(case, rounds: int, work: Path) -> dict:
    channels, size, kernels, dilations = case
    branchy = mixconv_block(channels, size, kernels, dilations)
    folded, _ = fold(branchy, "always")
    _, auto = fold(branchy, "auto")
    paths = {"branchy": work / "branchy.onnx", "folded": work / "folded.onnx"}
    onnx.save(branchy, paths["branchy"])
    onnx.save(folded, paths["folded"])
    best = {"branchy": float("inf"), "folded": float("inf")}
    for _ in range(3):  # alternate the two processes
        for name, path in paths.items():
            best[name] = min(best[name], in_own_process(path, rounds))
    decision = auto.rewrites[0].summary if auto.rewrites else auto.skips[0].reason
    return {
        "case": f"{channels}ch {size}px k{'/'.join(map(str, kernels))} "
        f"d{'/'.join(map(str, dilations))}",
        "branchy_us": best["branchy"] * 1e6,
        "folded_us": best["folded"] * 1e6,
        "ratio": best["folded"] / best["branchy"],
        "auto": "fold" if auto.rewrites else "refuse",
        "auto_reason": decision,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(time_one(args.one, args.repeat))
        return
    print(f"date {datetime.datetime.now().isoformat(timespec='minutes')}; "
          f"{platform.machine()} {os.cpu_count()} cores; load {os.getloadavg()}")  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            rows.append(measure(case, args.repeat, Path(tmp)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| block | branchy us | folded us | folded / branchy | auto | why |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['branchy_us']:.1f} | {r['folded_us']:.1f} | "
              f"{r['ratio']:.2f}x | {r['auto']} | {r['auto_reason']} |")  # fmt: skip


if __name__ == "__main__":
    main()
