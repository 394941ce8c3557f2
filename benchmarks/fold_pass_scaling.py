"""How the fold pass scales: time on chains of split-conv-concat blocks of 10k and 20k nodes.

Run: ``python benchmarks/fold_pass_scaling.py [--nodes 10000] [--repeats 3]``. Two cases, each at
N and 2N nodes (min of ``--repeats`` runs):

- *pass*: a chain of Split(4) -> 4 Conv -> Concat blocks; the fold pass alone (in process, on an
  already loaded onnx-ir model), and onnx-ir's load and save of the same model (issue #2);
- *optimize*: 300 blocks of Split(32) -> 32 Conv -> Concat (34 nodes each) and a final Relu, 10,201
  nodes, given as an ``onnx.ModelProto`` to ``gconv_compile.optimize(check=False)``: everything a
  user pays, the ModelProto entering onnx-ir and leaving it included (issue #14), and protobuf's
  own parse + serialise of the same model for scale.

Targets: N=10,000 under 2 s, and doubling the graph costs at most 2.2x. ``--gc-off`` times
optimize with Python's garbage collector disabled, to show what the collector costs.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time

import numpy as np
import onnx
import onnx_ir as ir
from gconv_compile.passes import FoldSplitConvConcat
from onnx import TensorProto, helper, numpy_helper

import gconv_compile

BRANCHES = 4
NODES_PER_BLOCK = BRANCHES + 2  # Split, N Conv, Concat
WIDE_BRANCHES = 32  # the optimize case: ResNeXt's cardinality
WIDE_BLOCKS = 300


def chain_model(
    nodes: int, seed: int = 0, *, branches: int = BRANCHES, final_relu: bool = False
) -> onnx.ModelProto:
    """A chain of Split(branches) -> Conv1x1 per part -> Concat blocks of about ``nodes`` nodes."""
    rng = np.random.default_rng(seed)
    blocks = nodes // (branches + 2)
    channels = 2 * branches
    graph_nodes, inits = [], [numpy_helper.from_array(np.full(branches, 2, np.int64), "sizes")]
    x = "x"
    for b in range(blocks):
        parts = [f"b{b}_p{i}" for i in range(branches)]
        graph_nodes.append(
            helper.make_node("Split", [x, "sizes"], parts, axis=1, name=f"b{b}_split")
        )
        outs = []
        for i, part in enumerate(parts):
            w = f"b{b}_w{i}"
            inits.append(
                numpy_helper.from_array(rng.standard_normal((2, 2, 1, 1)).astype(np.float32), w)
            )
            outs.append(f"b{b}_c{i}")
            graph_nodes.append(
                helper.make_node("Conv", [part, w], [outs[-1]], name=f"b{b}_conv{i}")
            )
        x = f"b{b}_y"
        graph_nodes.append(helper.make_node("Concat", outs, [x], axis=1, name=f"b{b}_concat"))
    if final_relu:
        graph_nodes.append(helper.make_node("Relu", [x], ["y"], name="relu"))
        x = "y"
    graph = helper.make_graph(
        graph_nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", channels, 4, 4])],
        inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def measure(nodes: int, repeats: int) -> dict[str, float]:
    proto = chain_model(nodes)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "chain.onnx")
        onnx.save(proto, path)
        pass_times, load_times, save_times = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            model = ir.load(path)
            load_times.append(time.perf_counter() - start)
            fold = FoldSplitConvConcat()
            start = time.perf_counter()
            result = fold(model)
            pass_times.append(time.perf_counter() - start)
            assert result.modified and len(fold.rewrites) == nodes // NODES_PER_BLOCK
            start = time.perf_counter()
            ir.save(model, os.path.join(tmp, "out.onnx"))
            save_times.append(time.perf_counter() - start)
    return {
        "nodes": len(proto.graph.node),
        "pass": min(pass_times),
        "load": min(load_times),
        "save": min(save_times),
    }


def measure_optimize(blocks: int, repeats: int, *, gc_off: bool = False) -> dict[str, float]:
    """``gconv_compile.optimize(check=False)`` on a ModelProto of ``blocks`` 32-branch blocks.

    ``gc_off``: with Python's cyclic garbage collector disabled during the call (it walks every
    live node and value of the model on each full collection).
    """
    proto = chain_model(blocks * (WIDE_BRANCHES + 2), branches=WIDE_BRANCHES, final_relu=True)
    optimize_times, proto_times = [], []
    for _ in range(repeats):
        if gc_off:
            gc.disable()
        start = time.perf_counter()
        out, report = gconv_compile.optimize(proto, check=False)
        optimize_times.append(time.perf_counter() - start)
        gc.enable()
        gc.collect()
        assert isinstance(out, onnx.ModelProto) and len(report.rewrites) == blocks
        # each block is one Conv(group=32) now, the Split gone (it fed only the branches)
        assert [n.op_type for n in out.graph.node] == ["Conv"] * blocks + ["Relu"]
        start = time.perf_counter()
        onnx.ModelProto.FromString(proto.SerializeToString())
        proto_times.append(time.perf_counter() - start)
    return {
        "nodes": len(proto.graph.node),
        "optimize": min(optimize_times),
        "proto": min(proto_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--gc-off", action="store_true", help="disable Python's GC during optimize (what it costs)"
    )
    args = parser.parse_args()
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()} {_cpu_name()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print("case: gconv_compile.optimize(ModelProto, check=False), Split(32) -> 32 Conv -> Concat")
    if args.gc_off:
        print("(Python's garbage collector disabled during optimize)")
    wide = [
        measure_optimize(b, args.repeats, gc_off=args.gc_off)
        for b in (WIDE_BLOCKS, 2 * WIDE_BLOCKS)
    ]
    print(f"{'nodes':>7} {'optimize':>9} {'proto parse+save':>17}")
    for row in wide:
        print(f"{row['nodes']:>7} {row['optimize']:>8.3f}s {row['proto']:>16.3f}s")
    ratio = wide[1]["optimize"] / wide[0]["optimize"]
    print(f"doubling ratio: {ratio:.2f}x (target <= 2.2x); "
          f"{wide[0]['nodes']} nodes in {wide[0]['optimize']:.3f}s (target < 2 s)\n")  # fmt: skip
    print("case: FoldSplitConvConcat alone on a loaded onnx-ir model, Split(4) -> 4 Conv -> Concat")
    small = measure(args.nodes, args.repeats)
    large = measure(2 * args.nodes, args.repeats)
    print(f"{'nodes':>7} {'fold pass':>10} {'ir.load':>9} {'ir.save':>9}")
    for row in (small, large):
        print(f"{row['nodes']:>7} {row['pass']:>9.3f}s {row['load']:>8.3f}s {row['save']:>8.3f}s")
    ratio = large["pass"] / small["pass"]
    print(f"doubling ratio: {ratio:.2f}x (target <= 2.2x); "
          f"{small['nodes']} nodes in {small['pass']:.3f}s (target < 2 s)")  # fmt: skip


def _cpu_name() -> str:
    with open("/proc/cpuinfo") as handle:
        return next(
            (ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), ""
        )


if __name__ == "__main__":
    main()
