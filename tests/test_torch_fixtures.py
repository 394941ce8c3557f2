"""The fold pass on what PyTorch's two ONNX exporters really write (tests/fixtures/torch/).

The fixtures come from ``scripts/make_torch_fixtures.py`` (its docstring lists the ops each
exporter wrote); these tests need onnxruntime but not torch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import gconv_compile

FIXTURES = Path(__file__).parent / "fixtures" / "torch"
REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_FIXTURE_BYTES = 200_000
ORT_MAX_IR_VERSION = 13
CHECK_BATCH = 3  # not the export batch (2): the folded model must keep the batch dynamic
SPLITTERS = {"Split", "Slice", "Concat"}


@dataclasses.dataclass(frozen=True)
class FoldCase:
    fixture: str
    exporter_ops: frozenset[str]  # the form under test: ops the fixture must contain
    split_by: str
    group: int
    weight_shape: tuple[int, ...]
    ops_after: dict[str, int]  # the whole graph after folding


@dataclasses.dataclass(frozen=True)
class RefuseCase:
    fixture: str
    reason: str


_TS_CHUNK = frozenset({"Shape", "Gather", "Add", "Div", "Mul", "Slice"})
_RESNEXT_AFTER = {"Add": 1, "BatchNormalization": 1, "Conv": 3, "Relu": 3}

FOLD_CASES = [
    FoldCase("chunk_conv_ts17", _TS_CHUNK, "Slice", 4, (16, 4, 3, 3), {"Conv": 1}),
    FoldCase("chunk_conv_dynamo18", frozenset({"Split"}), "Split", 4, (16, 4, 3, 3), {"Conv": 1}),
    FoldCase("slice_conv_bn_relu_ts17", frozenset({"Slice", "Relu"}), "Slice", 3, (24, 8, 3, 3),
             {"Conv": 1, "Relu": 1}),
    FoldCase("slice_conv_bn_relu_dynamo18", frozenset({"Slice", "Relu"}), "Slice", 3,
             (24, 8, 3, 3), {"Conv": 1, "Relu": 1}),
    FoldCase("split_conv1d_ts17", frozenset({"Split"}), "Split", 4, (24, 4, 3), {"Conv": 1}),
    FoldCase("split_conv1d_dynamo18", frozenset({"Split"}), "Split", 4, (24, 4, 3), {"Conv": 1}),
    FoldCase("resnext_block_ts17", _TS_CHUNK | {"BatchNormalization"}, "Slice", 8, (32, 4, 3, 3),
             _RESNEXT_AFTER),
    FoldCase("resnext_block_dynamo18", frozenset({"Split", "BatchNormalization"}), "Split", 8,
             (32, 4, 3, 3), _RESNEXT_AFTER),
]  # fmt: skip

_MIXED = "Conv kernels differ and"
_PERMUTED = "Concat order [(4, 8), (0, 4), (12, 16), (8, 12)] differs from the channel order"

REFUSE_CASES = [
    RefuseCase("mixed_kernel_nopad_ts17", _MIXED),
    RefuseCase("mixed_kernel_nopad_dynamo18", _MIXED),
    RefuseCase("permuted_concat_ts17", _PERMUTED),
    RefuseCase("permuted_concat_dynamo18", _PERMUTED),
]


def _path(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


def _op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in graph.node if n.op_type != "Constant"))


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    (y,) = session.run(None, {"x": x})
    return y


def _input(model: onnx.ModelProto, seed: int) -> np.ndarray:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [CHECK_BATCH, *(d.dim_value for d in dims[1:])]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_every_fixture_has_a_case_and_is_small_and_readable():
    names = {p.stem for p in FIXTURES.glob("*.onnx")}
    cases = {c.fixture for c in FOLD_CASES} | {c.fixture for c in REFUSE_CASES}
    assert names == cases
    for name in sorted(names):
        path = _path(name)
        assert path.stat().st_size < MAX_FIXTURE_BYTES, name
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version <= ORT_MAX_IR_VERSION, name
        assert model.producer_name == "pytorch", name
        assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer), (
            f"{name} has external data"
        )
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value, f"{name}: batch dim is not dynamic"
        opset = {o.domain: o.version for o in model.opset_import}[""]
        assert opset == (17 if name.endswith("_ts17") else 18), name


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: c.fixture)
def test_exporter_output_folds_into_one_grouped_conv(case: FoldCase):
    original = onnx.load(str(_path(case.fixture)))
    before_ops = _op_counts(original.graph)
    assert case.exporter_ops <= set(before_ops), f"fixture lacks the form under test: {before_ops}"

    model, report = gconv_compile.optimize(_path(case.fixture))

    assert report.skips == []
    assert len(report.rewrites) == 1
    details = report.rewrites[0].details
    assert details["group"] == case.group
    assert details["branches"] == case.group
    assert tuple(details["weight_shape"]) == case.weight_shape
    assert details["split_by"] == [case.split_by]
    folded = ir.serde.serialize_model(model)
    assert _op_counts(folded.graph) == case.ops_after
    assert not SPLITTERS & {n.op_type for n in folded.graph.node}
    assert report.nodes_after < report.nodes_before
    assert report.nodes_after == sum(case.ops_after.values())  # no Constant or shape math left
    (grouped,) = [n for n in folded.graph.node if n.name == details["new_node"]]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in grouped.attribute}
    assert attrs["group"] == case.group
    weights = {t.name: t for t in folded.graph.initializer}
    assert tuple(weights[grouped.input[1]].dims) == case.weight_shape

    assert report.check is not None and report.check.passed, report.lines()
    # Independently of the pipeline's check: the fixture and the result agree at another batch.
    for seed in (0, 1):
        x = _input(original, seed)
        np.testing.assert_allclose(_run(folded, x), _run(original, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", REFUSE_CASES, ids=lambda c: c.fixture)
def test_exporter_output_that_must_not_fold_is_refused(case: RefuseCase):
    original = onnx.load(str(_path(case.fixture)))

    model, report = gconv_compile.optimize(_path(case.fixture))

    assert report.rewrites == []
    assert len(report.skips) == 1
    assert case.reason in report.skips[0].reason
    assert report.check is None
    assert report.nodes_after == report.nodes_before
    result = ir.serde.serialize_model(model)
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in original.graph.node]
    x = _input(original, 0)
    np.testing.assert_array_equal(_run(result, x), _run(original, x))


def test_cli_optimize_on_torchscript_chunk_fixture(tmp_path: Path):
    source = _path("chunk_conv_ts17")
    out = tmp_path / "folded.onnx"
    report_path = tmp_path / "report.json"

    done = subprocess.run(
        [sys.executable, "-m", "gconv_compile", "optimize", str(source), "-o", str(out),
         "--report", str(report_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower()
    assert "folded" in done.stdout
    folded = onnx.load(str(out))
    assert _op_counts(folded.graph) == {"Conv": 1}
    data = json.loads(report_path.read_text())
    assert data["command"] == "optimize"
    assert data["output"] == str(out)
    assert data["summary"]["rewrites"] == 1
    assert data["summary"]["skipped"] == 0
    assert data["summary"]["check_passed"] is True
    assert data["summary"]["nodes_after"] < data["summary"]["nodes_before"]
    assert data["rewrites"][0]["details"]["group"] == 4
    assert data["rewrites"][0]["details"]["weight_shape"] == [16, 4, 3, 3]
    x = _input(folded, 0)
    original = onnx.load(str(source))
    np.testing.assert_allclose(_run(folded, x), _run(original, x), rtol=1e-4, atol=1e-5)
