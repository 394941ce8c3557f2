"""How the fold pass scales: time on a chain of split-conv-concat blocks of 10k and 20k nodes.

Run: ``python benchmarks/fold_pass_scaling.py [--nodes 10000]``. Prints, for N and 2N nodes, the
fold pass time (in process, on an already loaded onnx-ir model), onnx load and save time of the
same model, and the ratio of the two pass times. Targets (issue #2): N=10,000 under 2 s, and
doubling the graph costs at most 2.2x.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import onnx
import onnx_ir as ir
from gconv_compile.passes import FoldSplitConvConcat
from onnx import TensorProto, helper, numpy_helper

BRANCHES = 4
NODES_PER_BLOCK = BRANCHES + 2  # Split, N Conv, Concat


def chain_model(nodes: int, seed: int = 0) -> onnx.ModelProto:
    """A chain of Split(4) -> 4 Conv1x1 -> Concat blocks with about ``nodes`` nodes."""
    rng = np.random.default_rng(seed)
    blocks = nodes // NODES_PER_BLOCK
    channels = 8
    graph_nodes, inits = [], [numpy_helper.from_array(np.full(BRANCHES, 2, np.int64), "sizes")]
    x = "x"
    for b in range(blocks):
        parts = [f"b{b}_p{i}" for i in range(BRANCHES)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    small = measure(args.nodes, args.repeats)
    large = measure(2 * args.nodes, args.repeats)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"{'nodes':>7} {'fold pass':>10} {'ir.load':>9} {'ir.save':>9}")
    for row in (small, large):
        print(f"{row['nodes']:>7} {row['pass']:>9.3f}s {row['load']:>8.3f}s {row['save']:>8.3f}s")
    ratio = large["pass"] / small["pass"]
    print(f"doubling ratio: {ratio:.2f}x (target <= 2.2x); "
          f"{small['nodes']} nodes in {small['pass']:.3f}s (target < 2 s)")  # fmt: skip


if __name__ == "__main__":
    main()
