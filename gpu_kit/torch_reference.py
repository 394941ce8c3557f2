"""PyTorch's side of the GPU kit: the same convs and networks, timed with CUDA events.

``TorchGraph`` runs an ONNX graph with ``torch.nn.functional`` (cuDNN for every Conv) using the
model's own initializers, so ResNeXt-50 in torch has exactly the weights TVM's library gets.
It knows the ops of the kit's models; ``unsupported_ops`` names the rest. Only ``gpu_run.py``
imports this module, and only on the GPU machine (the rehearsal has no torch).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

SUPPORTED = {"Conv", "Relu", "Add", "Sum", "MaxPool", "AveragePool", "GlobalAveragePool",
             "Flatten", "Gemm", "BatchNormalization", "Split", "Concat", "Reshape", "Transpose",
             "Softmax"}  # fmt: skip


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({n.op_type for n in model.graph.node} - SUPPORTED)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(attrs: dict, rank: int = 2) -> tuple[int, ...]:
    pads = list(attrs.get("pads", [0] * 2 * rank))
    if pads[:rank] != pads[rank:]:
        raise ValueError(f"asymmetric pads {pads} are not supported")
    return tuple(pads[:rank])


def _conv(x, w, b, a):
    return F.conv2d(x, w, b, tuple(a.get("strides", [1, 1])), _pads(a),
                    tuple(a.get("dilations", [1, 1])), a.get("group", 1))  # fmt: skip


def _gemm(x, w, b, a):
    x = x.T if a.get("transA", 0) else x
    w = w.T if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * b if b is not None else y


def _batch_norm(x, scale, bias, mean, var, a):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _split(x, sizes, a, outputs):
    if sizes is None:
        sizes = a.get("split") or [x.shape[a.get("axis", 0)] // outputs] * outputs
    return torch.split(x, [int(s) for s in sizes], dim=a.get("axis", 0))


OPS: dict[str, Callable] = {
    "Relu": lambda x, a: F.relu(x),
    "Add": lambda x, y, a: x + y,
    "Sum": lambda *xs: sum(xs[:-1]),
    "MaxPool": lambda x, a: F.max_pool2d(x, tuple(a["kernel_shape"]),
                                         tuple(a.get("strides", [1, 1])), _pads(a)),
    "AveragePool": lambda x, a: F.avg_pool2d(x, tuple(a["kernel_shape"]),
                                             tuple(a.get("strides", [1, 1])), _pads(a),
                                             count_include_pad=bool(a.get("count_include_pad"))),
    "GlobalAveragePool": lambda x, a: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda x, a: torch.flatten(x, a.get("axis", 1)),
    "Softmax": lambda x, a: torch.softmax(x, dim=a.get("axis", -1)),
    "Transpose": lambda x, a: x.permute(*a["perm"]),
}  # fmt: skip


class TorchGraph:
    """An ONNX graph run op by op with torch on ``device`` in ``dtype``."""

    def __init__(self, model: onnx.ModelProto, device: str, dtype: torch.dtype) -> None:
        missing = unsupported_ops(model)
        if missing:
            raise ValueError(f"ops torch_reference does not run: {missing}")
        self.graph = model.graph
        self.values: dict[str, torch.Tensor] = {}
        self.constants: dict[str, np.ndarray] = {}
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            self.constants[tensor.name] = array
            if array.dtype.kind == "f":
                self.values[tensor.name] = torch.from_numpy(array.copy()).to(device, dtype)
        self.outputs = [v.name for v in model.graph.output]

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        env = {**self.values, **feeds}
        for node in self.graph.node:
            a = _attrs(node)
            args = [env.get(name) if name else None for name in node.input]
            results = self._run(node, args, a)
            for name, value in zip(node.output, results):
                env[name] = value
        return [env[name] for name in self.outputs]

    def _run(self, node, args, a) -> tuple:
        op = node.op_type
        if op == "Conv":
            return (_conv(args[0], args[1], args[2] if len(args) > 2 else None, a),)
        if op == "Gemm":
            return (_gemm(args[0], args[1], args[2] if len(args) > 2 else None, a),)
        if op == "BatchNormalization":
            return (_batch_norm(*args[:5], a),)
        if op == "Split":
            sizes = self.constants.get(node.input[1]) if len(node.input) > 1 else None
            return _split(args[0], sizes, a, len(node.output))
        if op == "Concat":
            return (torch.cat(args, dim=a["axis"]),)
        if op == "Reshape":
            shape = [int(d) for d in self.constants[node.input[1]]]
            shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
            return (args[0].reshape(shape),)
        return (OPS[op](*args, a),)


def time_cuda(run: Callable[[], object], warmup: int, runs: int) -> float:
    """Median milliseconds of ``run``, each bracketed by CUDA events on the current stream."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(run: Callable[[], object], warmup: int, runs: int) -> float:
    """``run`` captured once in a CUDA graph, then replays timed as :func:`time_cuda` does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # cuDNN picks its algorithms outside the capture
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return time_cuda(graph.replay, warmup, runs)


def copy_gbps(megabytes: int, warmup: int, runs: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    count = megabytes * 2**20 // 4
    src = torch.randn(count, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup, runs)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}[name]
