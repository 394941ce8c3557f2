"""Nothing lost: what the fold does not rewrite comes out of ``optimize`` as it went in.

The model here has one foldable block and, around it, everything a rewriter could drop:
metadata_props, doc strings on the model, graph and nodes, producer name and version, model
version and domain, value_info, a model-local function, a custom-domain node with its opset,
and an initializer that a folded Conv shares with a Conv outside the block. Each test writes
the model through the CLI (so saving is covered) and compares the files.

    X(8ch) ─ Split ─ conv0(w0) ─┐                     ┌─ peek = Identity(w0) ── W_SEEN
                   └ conv1(w1) ─ Concat ─ Y ─ Relu ─ R ─ AddOne (local function) ── Z
    X2(4ch) ─ other_conv(w0) ── OTHER                     (w0 shared with conv0)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import IR_VERSION, init, ints, tensor_info
from onnx import TensorProto, helper

import gconv_compile
from gconv_compile.cli import main as cli_main

FOLDED_NODES = {"split", "conv0", "conv1", "concat"}
CUSTOM_DOMAIN = "com.vendor.fancy"


def _rich_model(*, custom_op: bool = False, seed: int = 0) -> onnx.ModelProto:
    """One model holding every kind of thing a rewrite must keep (long on purpose: the inventory
    reads top to bottom in one place, and each test asserts on part of it)."""
    r = np.random.default_rng(seed)
    w0 = r.standard_normal((4, 4, 3, 3)).astype(np.float32)
    w1 = r.standard_normal((4, 4, 3, 3)).astype(np.float32)
    inits = [
        ints("split_sizes", [4, 4]),
        init("w0", w0),
        init("w1", w1),
        init("b0", r.standard_normal(4).astype(np.float32)),
        init("b1", r.standard_normal(4).astype(np.float32)),
        init("unused_but_kept", r.standard_normal(5).astype(np.float32)),
    ]
    inits[-1].doc_string = "an initializer nobody reads: dead code is the user's business"
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Split", ["X", "split_sizes"], ["x0", "x1"], axis=1, name="split"),
        helper.make_node("Conv", ["x0", "w0", "b0"], ["c0"], name="conv0", pads=pads),
        helper.make_node("Conv", ["x1", "w1", "b1"], ["c1"], name="conv1", pads=pads),
        helper.make_node("Concat", ["c0", "c1"], ["Y"], axis=1, name="concat"),
        helper.make_node("Relu", ["Y"], ["R"], name="relu"),
        helper.make_node("AddOne", ["R"], ["Z"], domain="local.fn", name="addone"),
        helper.make_node("Identity", ["w0"], ["W_SEEN"], name="peek"),
        helper.make_node("Conv", ["X2", "w0"], ["OTHER"], name="other_conv", pads=pads),
    ]
    if custom_op:
        nodes.append(
            helper.make_node("FancyOp", ["Z"], ["F"], domain=CUSTOM_DOMAIN, name="fancy", level=3)
        )
    for node in nodes:
        node.doc_string = f"doc of node {node.name}"
    outputs = [
        tensor_info("Z", ["N", 8, 6, 6]),
        tensor_info("W_SEEN", [4, 4, 3, 3]),
        tensor_info("OTHER", ["N", 4, 6, 6]),
    ]
    if custom_op:
        outputs.append(tensor_info("F", ["N", 8, 6, 6]))
    value_info = [
        tensor_info("Y", ["N", 8, 6, 6]),  # the Concat output: the fold keeps its name
        tensor_info("R", ["N", 8, 6, 6]),  # untouched intermediate
        tensor_info("c0", ["N", 4, 6, 6]),  # inside the block: may go with it
    ]
    value_info[1].doc_string = "value_info doc"
    graph = helper.make_graph(
        nodes,
        "rich",
        [tensor_info("X", ["N", 8, 6, 6]), tensor_info("X2", ["N", 4, 6, 6])],
        outputs,
        inits,
        value_info=value_info,
        doc_string="graph doc string",
    )
    function = helper.make_function(
        "local.fn",
        "AddOne",
        ["a"],
        ["b"],
        [
            helper.make_node(
                "Constant",
                [],
                ["one"],
                value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
            ),
            helper.make_node("Add", ["a", "one"], ["b"], doc_string="inside the function"),
        ],
        [helper.make_opsetid("", 13)],
        doc_string="adds one",
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("local.fn", 1)]
    if custom_op:
        opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, 3))
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        functions=[function],
        producer_name="preservation-test",
        producer_version="7.1.2",
        doc_string="model doc string",
    )
    model.ir_version = IR_VERSION
    model.model_version = 42
    model.domain = "org.example.models"
    helper.set_model_props(model, {"author": "a person", "license": "Apache-2.0", "empty": ""})
    onnx.checker.check_model(model, full_check=not custom_op)
    return model


def _optimize(model: onnx.ModelProto, folder: Path, *extra: str) -> onnx.ModelProto:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "in.onnx")
    code = cli_main(["optimize", str(folder / "in.onnx"), "-o", str(folder / "out.onnx"), *extra])
    assert code == 0
    return onnx.load(folder / "out.onnx")


@pytest.fixture(scope="module")
def rich_pair(tmp_path_factory) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = _rich_model()
    return model, _optimize(model, tmp_path_factory.mktemp("rich"))


def test_the_block_is_folded(rich_pair) -> None:
    """Guard: the other tests only mean something if the fold happened."""
    _, out = rich_pair
    names = {n.name for n in out.graph.node}
    assert not names & FOLDED_NODES
    grouped = [n for n in out.graph.node if n.op_type == "Conv" and n.input[0] == "X"]
    assert len(grouped) == 1
    assert (
        helper.get_attribute_value(next(a for a in grouped[0].attribute if a.name == "group")) == 2
    )


def test_model_fields_survive(rich_pair) -> None:
    model, out = rich_pair
    for field in ("ir_version", "producer_name", "producer_version", "model_version", "domain",
                  "doc_string"):  # fmt: skip
        assert getattr(out, field) == getattr(model, field), field
    assert out.graph.doc_string == model.graph.doc_string
    assert out.graph.name == model.graph.name
    # Order carries no meaning (onnx-ir keeps a dict); every pair must be there, empty ones too.
    assert {p.key: p.value for p in out.metadata_props} == {
        p.key: p.value for p in model.metadata_props
    }
    assert len(out.metadata_props) == len(model.metadata_props)
    assert {(o.domain, o.version) for o in out.opset_import} == {
        (o.domain, o.version) for o in model.opset_import
    }


def test_untouched_nodes_are_byte_identical(rich_pair) -> None:
    model, out = rich_pair
    after = {n.name: n for n in out.graph.node}
    for node in model.graph.node:
        if node.name in FOLDED_NODES:
            continue
        assert node.name in after, f"node {node.name} lost"
        assert after[node.name].SerializeToString() == node.SerializeToString(), node.name


def test_functions_are_byte_identical(rich_pair) -> None:
    model, out = rich_pair
    assert [f.SerializeToString() for f in out.functions] == [
        f.SerializeToString() for f in model.functions
    ]


def test_untouched_initializers_are_byte_identical(rich_pair) -> None:
    """w0 feeds folded conv0 and two nodes outside the block: it stays, unchanged."""
    model, out = rich_pair
    after = {t.name: t for t in out.graph.initializer}
    for name in ("w0", "unused_but_kept"):
        original = next(t for t in model.graph.initializer if t.name == name)
        assert name in after, f"initializer {name} lost"
        assert after[name].SerializeToString() == original.SerializeToString(), name
    # Only what the block alone used is gone.
    assert not {"w1", "b0", "b1", "split_sizes"} & set(after)
    consumers = {n.name: list(n.input) for n in out.graph.node}
    assert consumers["other_conv"] == ["X2", "w0"]
    assert consumers["peek"] == ["w0"]


def test_value_info_survives(rich_pair) -> None:
    """Every value_info entry whose value still exists keeps its type, shape and doc string."""
    model, out = rich_pair
    declared = {v.name: v for v in [*out.graph.value_info, *out.graph.output]}
    produced = {o for n in out.graph.node for o in n.output}
    kept = 0
    for info in model.graph.value_info:
        if info.name not in produced:
            assert info.name == "c0", f"value {info.name} vanished"
            continue
        assert info.name in declared, f"value_info for {info.name} lost"
        assert declared[info.name].type == info.type, info.name
        assert declared[info.name].doc_string == info.doc_string, info.name
        kept += 1
    assert kept == 2


def _ort_outputs(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    r = np.random.default_rng(seed)
    feeds = {
        "X": r.standard_normal((2, 8, 6, 6)).astype(np.float32),
        "X2": r.standard_normal((2, 4, 6, 6)).astype(np.float32),
    }
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_every_output_computes_the_same(rich_pair) -> None:
    model, out = rich_pair
    for seed in (0, 1):
        before, after = _ort_outputs(model, seed), _ort_outputs(out, seed)
        assert before.keys() == after.keys()
        for name in before:
            np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-5)
        # The shared weight is seen exactly as it was.
        assert after["W_SEEN"].tobytes() == before["W_SEEN"].tobytes()


def test_custom_domain_node_and_opset_survive(tmp_path: Path) -> None:
    """onnxruntime cannot run FancyOp, so this one goes through with --no-check."""
    model = _rich_model(custom_op=True)
    out = _optimize(model, tmp_path, "--no-check")
    assert not {n.name for n in out.graph.node} & FOLDED_NODES
    fancy = [n for n in out.graph.node if n.domain == CUSTOM_DOMAIN]
    original = next(n for n in model.graph.node if n.name == "fancy")
    assert [n.SerializeToString() for n in fancy] == [original.SerializeToString()]
    assert (CUSTOM_DOMAIN, 3) in {(o.domain, o.version) for o in out.opset_import}
    assert [o.name for o in out.graph.output] == ["Z", "W_SEEN", "OTHER", "F"]


def test_custom_domain_model_without_no_check_is_refused(tmp_path: Path, capsys) -> None:
    """Without --no-check the CLI says it cannot check, and writes nothing."""
    onnx.save(_rich_model(custom_op=True), tmp_path / "in.onnx")
    code = cli_main(["optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--no-check" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_two_runs_give_byte_identical_files(tmp_path: Path, external: bool) -> None:
    files = []
    for run in ("a", "b"):
        model = _rich_model()  # onnx.save with external data rewrites the proto it is given
        folder = tmp_path / run
        folder.mkdir()
        if external:
            onnx.save(model, folder / "in.onnx", save_as_external_data=True, location="in.bin",
                      size_threshold=256)  # fmt: skip
        else:
            onnx.save(model, folder / "in.onnx")
        assert cli_main(["optimize", str(folder / "in.onnx"), "-o", str(folder / "out.onnx")]) == 0
        files.append(sorted(p.name for p in folder.iterdir()))
    assert files[0] == files[1]
    assert ("out.onnx.data" in files[0]) == external
    for name in files[0]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize("fixture", ["chunk_conv_ts17", "resnext_block_ts17"])
def test_optimize_and_expand_leave_the_callers_proto_as_it_was(fixture):
    """TorchScript exports keep weights and bounds in Constant nodes; onnx-ir names their
    tensors in place, so a proto given to the API must be copied, not wrapped."""
    path = Path(__file__).parent / "fixtures" / "torch" / f"{fixture}.onnx"
    proto = onnx.load(path)
    before = proto.SerializeToString(deterministic=True)
    folded, _ = gconv_compile.optimize(proto, check=False)
    gconv_compile.expand(folded, check=False)
    assert proto.SerializeToString(deterministic=True) == before
