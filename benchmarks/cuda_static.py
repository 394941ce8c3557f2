"""Static review of the CUDA kernels for ResNeXt-50's grouped and MobileNetV2's depthwise convs.

Run: ``CUDA_PATH=/usr/local/cuda-13.0 python benchmarks/cuda_static.py [--dtype float32 float16]
[--arch sm_90] [--markdown]``

No GPU needed: for each distinct conv (batch 1, 224x224 networks; conv + bias + Relu as fused in
the models) the kernel our CUDA schedule generates is compiled with nvcc for sm_90 and reviewed
by ``gconv_compile.tvm_schedules.cuda_static``. One row per conv and dtype:

- ``n``: how many convs of the network have this shape;
- ``regs``, ``spill`` (bytes stored + loaded), ``smem`` (bytes), ``threads`` per block,
  ``blocks``: from ptxas and the launch shape;
- ``MB``: minimum DRAM traffic (every argument once); ``MFLOP``;
- ``roof``: the H200 roofline time; ``bound``: the static lower bound of this code (hot loop x
  grid, see cuda_static) and what sets it; ``x``: bound / roofline;
- hot loop: ``lds/fma`` shared loads per FMA operation, ``fma%`` FMA instructions among the
  loop's instructions, ``guards`` conditional branches plus predicated FMAs in it.

The last lines sum each network's bounds and rooflines (over all its convs, ``n`` included).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnext_model import STAGES, stage_convs  # noqa: E402

ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


@dataclass(frozen=True)
class Layer:
    network: str
    name: str
    channels: int
    size: int
    stride: int
    group: int
    count: int

    @property
    def kind(self) -> str:
        return "depthwise" if self.group == self.channels else "grouped"


# MobileNetV2 (224x224): the depthwise 3x3 convs, (channels, input size, stride, count)
MOBILENET_V2_DEPTHWISE = [(32, 112, 1, 1), (96, 112, 2, 1), (144, 56, 1, 1), (144, 56, 2, 1),
                          (192, 28, 1, 2), (192, 28, 2, 1), (384, 14, 1, 4), (576, 14, 1, 2),
                          (576, 14, 2, 1), (960, 7, 1, 3)]  # fmt: skip


def layers() -> list[Layer]:
    """The distinct grouped convs of ResNeXt-50 32x4d and depthwise convs of MobileNetV2."""
    out = []
    for shape in stage_convs():
        stage = int(shape.name[1]) - 1
        blocks = STAGES[stage][0]
        count = 1 if shape.stride == 2 else blocks - (1 if stage > 0 else 0)
        out.append(Layer("resnext50", shape.name, shape.in_channels, shape.size, shape.stride,
                         shape.group, count))  # fmt: skip
    for channels, size, stride, count in MOBILENET_V2_DEPTHWISE:
        name = f"dw{channels}_{size}_s{stride}"
        out.append(Layer("mobilenet_v2", name, channels, size, stride, channels, count))
    return out


def layer_model(layer: Layer, dtype: str = "float32", seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 pad 1 + bias + Relu with seeded random weights, input 'X'."""
    r = np.random.default_rng(seed)
    c, g = layer.channels, layer.group
    weight = (r.standard_normal((c, c // g, 3, 3)) / math.sqrt(9 * c // g)).astype(dtype)
    bias = r.standard_normal(c).astype(dtype)
    nodes = [
        helper.make_node(
            "Conv",
            ["X", "W", "B"],
            ["C"],
            group=g,
            kernel_shape=[3, 3],
            strides=[layer.stride] * 2,
            pads=[1] * 4,
        ),  # fmt: skip
        helper.make_node("Relu", ["C"], ["Y"]),
    ]
    elem = ELEM[dtype]
    graph = helper.make_graph(
        nodes,
        layer.name,
        [helper.make_tensor_value_info("X", elem, [1, c, layer.size, layer.size])],
        [helper.make_tensor_value_info("Y", elem, [None] * 4)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def review_layers(dtypes, arch: str = "sm_90") -> dict:
    """(layer, dtype) -> ``cuda_static.Review`` of its kernel, for every layer and dtype."""
    from gconv_compile.tvm_schedules import cuda_static
    from gconv_compile.tvm_schedules.cuda_kernels import conv_kernels

    keys, kernels = [], []
    for dtype in dtypes:
        for layer in layers():
            found = conv_kernels(layer_model(layer, dtype), arch)
            if len(found) != 1:
                raise RuntimeError(f"{layer.name}: {len(found)} scheduled kernels, expected 1")
            keys.append((layer, dtype))
            kernels.append(found[0])
    return dict(zip(keys, cuda_static.review_many(kernels, arch)))


COLUMNS = ["layer", "dtype", "n", "regs", "spill", "smem", "threads", "blocks", "MB", "MFLOP",
           "roof us", "bound us", "by", "x", "lds/fma", "fma%", "guards"]  # fmt: skip


def row(layer: Layer, dtype: str, r) -> list[str]:
    loop = r.loop
    return [
        f"{layer.network}/{layer.name}", dtype, str(layer.count), str(r.ptxas.registers),
        str(r.ptxas.spill_stores + r.ptxas.spill_loads), str(r.ptxas.shared_bytes),
        str(r.kernel.threads), str(r.kernel.blocks), f"{r.min_bytes / 1e6:.2f}",
        f"{r.flops / 1e6:.1f}", f"{r.roofline_s * 1e6:.2f}", f"{r.bound_s * 1e6:.2f}",
        r.bound_by, f"{r.bound_s / r.roofline_s:.1f}", f"{loop.shared_loads_per_fma:.2f}",
        f"{100 * loop.fma_fraction:.0f}", str(loop.guard_branches + loop.predicated_fmas),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    from gconv_compile.tvm_schedules import cuda_static

    if cuda_static.toolkit() is None:
        print("cuda_static: nvcc or cuobjdump not found (set CUDA_PATH; pip install "
              "nvidia-cuda-cuobjdump)", file=sys.stderr)  # fmt: skip
        return 2
    rows, totals = [], {}
    for (layer, dtype), r in review_layers(args.dtype, args.arch).items():
        rows.append(row(layer, dtype, r))
        key = (layer.network, dtype)
        bound, roof = totals.get(key, (0.0, 0.0))
        totals[key] = (bound + layer.count * r.bound_s, roof + layer.count * r.roofline_s)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"{when}; {platform.machine()} {os.cpu_count()} cores; nvcc from "
          f"{os.environ.get('CUDA_PATH', 'PATH')}; arch {args.arch}; bounds for H200")  # fmt: skip
    sep = " | " if args.markdown else "  "
    lines = [COLUMNS] + ([["---"] * len(COLUMNS)] if args.markdown else []) + rows
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    for line in lines:
        text = sep.join(cell.ljust(w) for cell, w in zip(line, widths))
        print(f"| {text} |" if args.markdown else text)
    print()
    for (network, dtype), (bound, roof) in totals.items():
        print(f"{network} {dtype}: sum of bounds {bound * 1e6:.1f} us, of rooflines "
              f"{roof * 1e6:.1f} us ({bound / roof:.1f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
