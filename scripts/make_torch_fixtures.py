"""Export small PyTorch models with both ONNX exporters into tests/fixtures/torch/.

Usage (in a venv with the optional extra, ``pip install -e '.[torch]'``)::

    python scripts/make_torch_fixtures.py --out tests/fixtures/torch

Every model is exported twice, batch dimension dynamic, weights inline:

* ``<name>_ts17.onnx``: ``torch.onnx.export(..., dynamo=False, opset_version=17,
  dynamic_axes=...)``, the TorchScript exporter;
* ``<name>_dynamo18.onnx``: ``torch.onnx.export(..., dynamo=True, opset_version=18,
  dynamic_shapes=...)``, the torch.export exporter (with its default onnxscript optimisation).

The runs are deterministic: each model seeds torch with its own seed before it builds its
weights, and exporting twice gives byte-identical files. After writing a file the script checks
it with ``onnx.checker`` and compares ``onnx.reference`` against eager PyTorch at another batch
size (so the dynamic batch really is dynamic).

What the exporters wrote (torch 2.13.0+cpu, onnxscript 0.7.2, onnx 1.23.2; op counts of the main
graph without ``Constant`` nodes; ``--list`` prints them)::

    fixture                      IR  opset  ops
    chunk_conv_ts17               8  17     Shape, Gather, Add, Div, 4 Mul, 4 Slice, 4 Conv, Concat
    chunk_conv_dynamo18          10  18     Split(num_outputs=4), 4 Conv, Concat
    slice_conv_bn_relu_ts17       8  17     3 Slice, 3 Conv, 3 Relu, Concat
    slice_conv_bn_relu_dynamo18  10  18     3 Slice, 3 Conv, 3 Relu, Concat
    split_conv1d_ts17             8  17     Split(split input [4, 4, 4, 4]), 4 Conv, Concat
    split_conv1d_dynamo18        10  18     Split(num_outputs=4), 4 Conv, Concat
    resnext_block_ts17            8  17     Shape, Gather, 2 Add, Div, 8 Mul, 8 Slice, 10 Conv,
                                            BatchNormalization, 3 Relu, Concat
    resnext_block_dynamo18       10  18     Split(num_outputs=8), 10 Conv, BatchNormalization,
                                            3 Relu, Add, Concat
    mixed_kernel_nopad_ts17       8  17     Shape, Gather, Add, Div, 2 Mul, 2 Slice, 2 Conv, Concat
    mixed_kernel_nopad_dynamo18  10  18     Split(num_outputs=2), 2 Conv, Concat
    permuted_concat_ts17          8  17     as chunk_conv_ts17, Concat inputs in order 1, 0, 3, 2
    permuted_concat_dynamo18     10  18     as chunk_conv_dynamo18, Concat inputs in order 1, 0, 3, 2

Details that matter to the fold pass:

* TorchScript writes ``torch.chunk(x, n, dim=1)`` as ``Shape(x) -> Gather(indices=[1], axis 0)
  -> Add(n-1) -> Div(n) -> Mul(k)`` (all int64, 1-D), with ``Mul(k)`` feeding the ``ends`` of
  Slice k and the ``starts`` of Slice k+1; ``starts`` of the first Slice is a Constant [0],
  ``axes`` the Constant [1] (the same one the Gather uses), no ``steps`` input. The bounds are
  known only by folding that arithmetic over the static channel dim; in the ResNeXt block that
  dim is of an intermediate value (a Relu output), known only through shape inference.
* ``x[:, a:b]`` becomes ``Slice(x, [a], [b], axes=[1], steps=[1])`` in both exporters: operands
  are Constant nodes (TorchScript) or initializers shared between the Slices (dynamo: one
  initializer is both the ``ends`` of one Slice and the ``starts`` of the next, and ``axes`` and
  ``steps`` are the same initializer [1]).
* Both exporters fuse an eval-mode Conv + BatchNormalization into the Conv (TorchScript's eval
  peephole; onnxscript's ``FuseBatchNormIntoConv`` rule under dynamo, recorded in the nodes'
  ``pkg.onnxscript.rewriter.rule_name``), so ``slice_conv_bn_relu_*`` reach the pass as
  Slice -> Conv(with bias) -> Relu. The BatchNormalization after the Concat in the ResNeXt
  block stays in both (it follows no Conv).
* ``torch.split(x, 4, dim=1)`` becomes Split with a constant ``split`` input (TorchScript);
  dynamo writes ``Split(axis=1, num_outputs=n)`` for both ``torch.split`` and ``torch.chunk``.
* Dynamo attaches metadata_props to every node (``pkg.torch.onnx.stack_trace``, ``namespace``,
  ...) and writes ``auto_pad="NOTSET"`` explicitly on every Conv; TorchScript writes no metadata.
* TorchScript writes IR version 8, dynamo IR version 10; both are kept (onnxruntime reads at
  most 13, so anything newer would be lowered to 10 here).
* Not a fixture: ``dynamo=True, optimize=False`` writes ``SplitToSequence`` + ``SequenceAt`` for
  chunk/split, and a double Slice plus unfused BatchNormalization with Expand-ed parameters for
  the slicing model; it is not the exporter's default and the pass does not claim that form.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import torch
from torch import nn

logger = logging.getLogger("make_torch_fixtures")

REPO_ROOT = Path(__file__).resolve().parent.parent
ORT_MAX_IR_VERSION = 13  # onnxruntime refuses newer models
FALLBACK_IR_VERSION = 10
MAX_FIXTURE_BYTES = 200_000
EXAMPLE_BATCH = 2  # torch.export specialises a dim of size 1, so the example batch is 2
CHECK_BATCH = 3


def _randomise_batch_norm(bn: nn.BatchNorm2d) -> None:
    """Non-trivial running statistics so a lost BatchNormalization shows in the numbers."""
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)


class ChunkConv(nn.Module):
    """``torch.chunk(x, 4, dim=1)`` -> 4 Conv2d(3x3, pad 1) -> ``torch.cat(dim=1)``."""

    def __init__(self, channels: int = 16, chunks: int = 4, out_per_branch: int = 4) -> None:
        super().__init__()
        self.chunks = chunks
        width = channels // chunks
        self.convs = nn.ModuleList(
            nn.Conv2d(width, out_per_branch, 3, padding=1) for _ in range(chunks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, self.chunks, dim=1)
        return torch.cat([conv(part) for conv, part in zip(self.convs, parts)], dim=1)


class SliceConvBnRelu(nn.Module):
    """``x[:, i*w:(i+1)*w]`` -> Conv2d -> BatchNorm2d (eval) -> ReLU, for 3 branches -> cat."""

    def __init__(self, width: int = 8, branches: int = 3) -> None:
        super().__init__()
        self.width = width
        self.branches = nn.ModuleList()
        for _ in range(branches):
            bn = nn.BatchNorm2d(width)
            _randomise_batch_norm(bn)
            self.branches.append(
                nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), bn, nn.ReLU())
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.width
        outs = [branch(x[:, i * w : (i + 1) * w]) for i, branch in enumerate(self.branches)]
        return torch.cat(outs, dim=1)


class SplitConv1d(nn.Module):
    """``torch.split(x, 4, dim=1)`` -> 4 Conv1d(k=3, pad 1) -> cat."""

    def __init__(self, channels: int = 16, width: int = 4, out_per_branch: int = 6) -> None:
        super().__init__()
        self.width = width
        self.convs = nn.ModuleList(
            nn.Conv1d(width, out_per_branch, 3, padding=1) for _ in range(channels // width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.width, dim=1)
        return torch.cat([conv(part) for conv, part in zip(self.convs, parts)], dim=1)


class ResNeXtBlock(nn.Module):
    """1x1 conv, chunk -> 8 branch 3x3 convs -> cat, BN, ReLU, 1x1 conv, BN, residual add."""

    def __init__(self, channels: int = 16, inner: int = 32, cardinality: int = 8) -> None:
        super().__init__()
        self.cardinality = cardinality
        width = inner // cardinality
        self.reduce = nn.Conv2d(channels, inner, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.branches = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(cardinality)
        )
        self.bn_branches = nn.BatchNorm2d(inner)
        self.expand = nn.Conv2d(inner, channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(channels)
        for bn in (self.bn_reduce, self.bn_branches, self.bn_expand):
            _randomise_batch_norm(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_reduce(self.reduce(x)))
        parts = torch.chunk(y, self.cardinality, dim=1)
        y = torch.cat([conv(part) for conv, part in zip(self.branches, parts)], dim=1)
        y = torch.relu(self.bn_branches(y))
        y = self.bn_expand(self.expand(y))
        return torch.relu(y + x)


class MixedKernelNoPad(nn.Module):
    """Must not fold: a 3x3 pad-0 and a 5x5 pad-1 branch (same output size, no shared grid)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        width = channels // 2
        self.small = nn.Conv2d(width, width, 3, padding=0)
        self.large = nn.Conv2d(width, width, 5, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(x, 2, dim=1)
        return torch.cat([self.small(a), self.large(b)], dim=1)


class PermutedConcat(ChunkConv):
    """Must not fold (as the pass stands): the Concat takes the branches in order 1, 0, 3, 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, self.chunks, dim=1)
        outs = [conv(part) for conv, part in zip(self.convs, parts)]
        return torch.cat([outs[1], outs[0], outs[3], outs[2]], dim=1)


@dataclasses.dataclass(frozen=True)
class FixtureModel:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch dim
    seed: int


MODELS = (
    FixtureModel("chunk_conv", ChunkConv, (16, 8, 8), seed=1),
    FixtureModel("slice_conv_bn_relu", SliceConvBnRelu, (24, 8, 8), seed=2),
    FixtureModel("split_conv1d", SplitConv1d, (16, 8), seed=3),
    FixtureModel("resnext_block", ResNeXtBlock, (16, 8, 8), seed=4),
    FixtureModel("mixed_kernel_nopad", MixedKernelNoPad, (16, 8, 8), seed=5),
    FixtureModel("permuted_concat", PermutedConcat, (16, 8, 8), seed=6),
)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )  # fmt: skip


def export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, opset_version=18,
        input_names=["x"], output_names=["y"], dynamic_shapes=({0: batch},),
        external_data=False, verbose=False,
    )  # fmt: skip


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "ts17": export_torchscript,
    "dynamo18": export_dynamo,
}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(n.op_type for n in model.graph.node if n.op_type != "Constant")
    return dict(sorted(counts.items()))


def _relative_stack_traces(model: onnx.ModelProto) -> None:
    """Make the dynamo exporter's per-node stack traces independent of where things are installed.

    The traces name this script and torch's own files by absolute path; the fixtures keep the
    metadata (the pass must carry metadata through) but with the paths made relative.
    """
    roots = {
        str(REPO_ROOT) + "/": "",
        str(Path(torch.__file__).resolve().parent.parent) + "/": "<site-packages>/",
    }
    for node in model.graph.node:
        for prop in node.metadata_props:
            for root, replacement in roots.items():
                prop.value = prop.value.replace(root, replacement)
    data = model.SerializeToString()
    for root in roots:
        if root.encode() in data:
            raise RuntimeError(f"the model still names the local path {root}")


def _finish(exported: Path, target: Path) -> onnx.ModelProto:
    """Load what the exporter wrote, make it readable by onnxruntime, save it with inline weights."""
    model = onnx.load(str(exported), load_external_data=True)
    _relative_stack_traces(model)
    save_fixture(model, target)
    return model


def save_fixture(model: onnx.ModelProto, target: Path, max_bytes: int = MAX_FIXTURE_BYTES) -> None:
    """Check ``model`` and write it inline, readable by onnxruntime, within ``max_bytes``."""
    if model.ir_version > ORT_MAX_IR_VERSION:
        model.ir_version = FALLBACK_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    if len(data) > max_bytes:
        raise RuntimeError(f"{target.name}: {len(data)} bytes, over {max_bytes}")
    target.write_bytes(data)


def _check_against_torch(model: onnx.ModelProto, module: nn.Module, shape, name: str) -> float:
    """Max abs difference of onnx.reference against eager PyTorch at another batch size."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn((CHECK_BATCH, *shape), generator=generator)
    with torch.no_grad():
        expected = module(x).numpy()
    (actual,) = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x.numpy()})
    if actual.shape != expected.shape:
        raise RuntimeError(f"{name}: output shape {actual.shape}, PyTorch gives {expected.shape}")
    error = float(np.max(np.abs(actual - expected)))
    if not np.allclose(actual, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{name}: onnx.reference differs from PyTorch by {error:.3g}")
    return error


def make_fixtures(out: Path) -> list[Path]:
    """Export every model with every exporter into ``out``; return the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="torch-fixtures-") as workdir:
        for spec in MODELS:
            for tag, export in EXPORTERS.items():
                torch.manual_seed(spec.seed)
                module = spec.build().eval()
                example = torch.randn((EXAMPLE_BATCH, *spec.input_shape))
                name = f"{spec.name}_{tag}.onnx"
                exported = Path(workdir) / name
                export(module, example, exported)
                model = _finish(exported, out / name)
                error = _check_against_torch(model, module, spec.input_shape, name)
                logger.info(
                    "%s: IR %d, %d bytes, max abs error vs PyTorch %.2g, ops %s",
                    name, model.ir_version, (out / name).stat().st_size, error, op_counts(model),
                )  # fmt: skip
                written.append(out / name)
    return written


def list_fixtures(folder: Path) -> None:
    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path))
        print(f"{path.name:32} IR {model.ir_version:2}  {op_counts(model)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/torch"))
    parser.add_argument("--list", action="store_true", help="print the op counts and exit")
    args = parser.parse_args(argv)
    # onnxscript's optimiser logs every step at INFO; only this script's lines are wanted.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    if args.list:
        list_fixtures(args.out)
        return 0
    written = make_fixtures(args.out)
    print(f"wrote {len(written)} fixtures to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
