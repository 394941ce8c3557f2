"""gconv_compile.tvm_schedules: every conv schedule computes what onnxruntime computes.

Each case builds a small ONNX model (seeded random weights and inputs), compiles it with TVM
through ``tvm_schedules.relax_pipeline`` for the host CPU, checks that the conv function got our
schedule (not the fallback) in the expected form, and compares the output with onnxruntime's.
The CUDA cases only build (no GPU needed) and read the generated source.
"""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest
from builders import init, make_model, rng, tensor_info
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from gconv_compile import tvm_schedules  # noqa: E402

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
NP = {F32: np.float32, F16: np.float16}


def conv_model(
    c_in: int,
    c_out: int,
    size: tuple[int, int],
    *,
    group: int = 1,
    kernel: tuple[int, int] = (3, 3),
    stride: int = 1,
    pads: tuple[int, int, int, int] = (1, 1, 1, 1),
    dilation: int = 1,
    bias: bool = True,
    epilogue: str = "relu",
    dtype: int = F32,
    batch: int | str = 1,
    weight_as_input: bool = False,
    repeat: int = 1,
    seed: int = 0,
):
    """Conv (+bias) (+Relu / +residual Add+Relu / +BN), optionally ``repeat`` same-shape convs."""
    r = rng(seed)
    np_t = NP[dtype]
    nodes, inits, inputs = [], [], [tensor_info("X", [batch, c_in, *size], dtype)]
    x = "X"
    for i in range(repeat):
        w = r.standard_normal((c_out, c_in // group, *kernel)).astype(np_t)
        if weight_as_input:
            inputs.append(tensor_info(f"W{i}", list(w.shape), dtype))
        else:
            inits.append(init(f"W{i}", w))
        conv_in = [x, f"W{i}"]
        if bias:
            inits.append(init(f"B{i}", r.standard_normal(c_out).astype(np_t)))
            conv_in.append(f"B{i}")
        attrs = dict(
            kernel_shape=list(kernel),
            strides=[stride] * 2,
            pads=list(pads),
            dilations=[dilation] * 2,
        )
        nodes.append(helper.make_node("Conv", conv_in, [f"C{i}"], group=group, **attrs))
        y = f"C{i}"
        if epilogue == "relu":
            nodes.append(helper.make_node("Relu", [y], [f"R{i}"]))
            y = f"R{i}"
        elif epilogue == "residual":
            nodes.append(helper.make_node("Add", [y, x], [f"S{i}"]))
            nodes.append(helper.make_node("Relu", [f"S{i}"], [f"R{i}"]))
            y = f"R{i}"
        elif epilogue == "bn":
            for p, v in (("s", r.uniform(0.5, 1.5, c_out)), ("b", r.standard_normal(c_out)),
                         ("m", r.standard_normal(c_out)), ("v", r.uniform(0.5, 2.0, c_out))):  # fmt: skip
                inits.append(init(f"bn{i}{p}", v.astype(np_t)))
            nodes.append(
                helper.make_node(
                    "BatchNormalization", [y] + [f"bn{i}{p}" for p in "sbmv"], [f"N{i}"]
                )
            )
            y = f"N{i}"
        x = y
    outputs = [helper.make_tensor_value_info(x, dtype, [None] * 4)]
    return make_model(nodes, inputs, outputs, inits)


def random_feeds(model, seed: int, batch: int = 1) -> dict[str, np.ndarray]:
    r = rng(seed)
    feeds = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        shape = [d.dim_value if d.dim_value else batch for d in t.shape.dim]
        feeds[value.name] = r.standard_normal(shape).astype(NP[t.elem_type])
    return feeds


def compile_cpu(model, *, form: str | None = None, mcpu: str | None = None):
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    spec = tvm_schedules.host_target()
    target = tvm.target.Target({**spec, "mcpu": mcpu} if mcpu else spec)
    decisions: list = []
    mod = from_onnx(model, keep_params_in_input=False)
    pipeline = tvm_schedules.relax_pipeline(target, decisions=decisions, form=form)
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm, decisions


def run_both(model, feeds: dict[str, np.ndarray], vm) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = session.run(None, feeds)[0]
    names = [v.name for v in model.graph.input]
    out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names]).numpy()
    return out, ref


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: int) -> None:
    assert out.shape == ref.shape
    scale = float(np.abs(ref.astype(np.float32)).max())
    tol = 2e-2 if dtype == F16 else 1e-5
    np.testing.assert_allclose(
        out.astype(np.float32), ref.astype(np.float32), rtol=0, atol=tol * scale
    )


def conv_decisions(decisions) -> list:
    return [d for d in decisions if d.schedule.startswith("cpu-") and d.schedule.endswith("-conv")]


# id, model kwargs, expected kind, preferred form
CPU_CASES = [
    ("dense-3x3-odd", dict(c_in=8, c_out=16, size=(9, 7)), "dense", None),
    ("dense-1x1-pointwise-7x7", dict(c_in=32, c_out=32, size=(7, 7), kernel=(1, 1), pads=(0,) * 4), "dense", None),
    ("dense-1x1-pointwise-pixel", dict(c_in=16, c_out=8, size=(8, 16), kernel=(1, 1), pads=(0,) * 4), "dense", "pixel"),
    ("dense-1x1-stride2", dict(c_in=16, c_out=32, size=(9, 9), kernel=(1, 1), pads=(0,) * 4, stride=2), "dense", None),
    ("grouped-g2", dict(c_in=8, c_out=8, size=(7, 10), group=2), "grouped", None),
    ("grouped-g4-stride2-odd", dict(c_in=16, c_out=32, size=(11, 11), group=4, stride=2), "grouped", "channel"),
    ("grouped-g4-stride2-pixel", dict(c_in=16, c_out=32, size=(11, 16), group=4, stride=2), "grouped", "pixel"),
    ("grouped-g8-dilation2", dict(c_in=32, c_out=32, size=(12, 12), group=8, dilation=2, pads=(2,) * 4), "grouped", None),
    ("grouped-g32-resnext-like", dict(c_in=128, c_out=128, size=(14, 14), group=32), "grouped", None),
    ("grouped-kernel3x5-asym-pad", dict(c_in=12, c_out=12, size=(9, 13), group=3, kernel=(3, 5), pads=(1, 2, 0, 1)), "grouped", None),
    ("grouped-16out-per-group-channel", dict(c_in=32, c_out=64, size=(6, 6), group=4), "grouped", "channel"),
    ("depthwise", dict(c_in=16, c_out=16, size=(12, 12), group=16), "depthwise", None),
    ("depthwise-stride2-odd", dict(c_in=8, c_out=8, size=(13, 13), group=8, stride=2), "depthwise", None),
    ("groups-eq-channels-multiplier3", dict(c_in=8, c_out=24, size=(8, 8), group=8), "grouped", None),
    ("no-bias-no-epilogue", dict(c_in=8, c_out=16, size=(8, 8), group=2, bias=False, epilogue="none"), "grouped", None),
    ("residual-add-relu", dict(c_in=16, c_out=16, size=(8, 8), group=4, epilogue="residual"), "grouped", None),
    ("batch-norm", dict(c_in=16, c_out=16, size=(8, 8), group=4, epilogue="bn"), "grouped", None),
    ("float16-grouped", dict(c_in=16, c_out=16, size=(8, 8), group=4, dtype=F16), "grouped", None),
    ("float16-pointwise", dict(c_in=16, c_out=32, size=(7, 7), kernel=(1, 1), pads=(0,) * 4, dtype=F16), "dense", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "kind", "form"), [c[1:] for c in CPU_CASES], ids=[c[0] for c in CPU_CASES]
)
def test_cpu_conv_matches_onnxruntime(kwargs, kind, form):
    model = conv_model(**kwargs)
    vm, decisions = compile_cpu(model, form=form)
    convs = conv_decisions(decisions)
    assert [d.schedule for d in convs] == [f"cpu-{kind}-conv"], [d.line() for d in decisions]
    if form is not None:
        assert f"{form} form" in convs[0].detail
    dtype = kwargs.get("dtype", F32)
    out, ref = run_both(model, random_feeds(model, seed=1), vm)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    ("size", "stride", "vector", "split"),
    [((7, 7), 1, 7, False), ((14, 14), 2, 7, True), ((12, 12), 1, 12, False),
     ((28, 28), 2, 14, False), ((15, 15), 2, 8, False), ((112, 112), 2, 8, False)],
    ids=["7x7", "14x14-stride2-split", "12x12", "28x28-stride2", "15x15-stride2-odd-pad",
         "112x112-stride2-long-rows"],
)  # fmt: skip
def test_depthwise_on_narrow_rows_vectorises_the_row(size, stride, vector, split):
    """A 7-wide row has no power-of-two vector: the whole row is the vector (was scalar code).
    12 is split 12 (not 4) where a register holds 16 lanes, into 4s where it holds 4. A stride-2
    conv with short output rows pads its input into even and odd columns (an odd padded width
    cannot). Long stride-2 rows (56 outputs) take one vector per row and 4 rows a tile."""
    model = conv_model(32, 32, size, group=32, stride=stride)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    lanes = int(re.search(r"(\d+) lanes", conv.detail).group(1))
    expected = vector if vector <= lanes else 4
    assert f"pixel form: {expected}-wide vectors" in conv.detail, conv.detail
    assert ("input columns split even/odd" in conv.detail) == split, conv.detail
    if stride == 2 and size[1] // 2 > 28:  # long gathered rows: one vector per row, 4 rows
        assert "(1 ch x 4 row x 1 col)" in conv.detail, conv.detail
    out, ref = run_both(model, random_feeds(model, seed=8), vm)
    assert_close(out, ref, F32)


@pytest.mark.parametrize(
    ("mcpu", "expected"),
    [("haswell", (8, 16)), ("znver3", (8, 16)), ("skylake-avx512", (16, 32)),
     ("znver4", (16, 32)), ("x86-64", (4, 16))],
)  # fmt: skip
def test_vector_width_follows_the_target_cpu_not_this_machine(mcpu, expected):
    """An AVX2 build made on an AVX-512 machine gets AVX2 tiles (it got 16-lane ones)."""
    from gconv_compile.targets import host_llvm_target
    from gconv_compile.tvm_schedules.cpu import vector_lanes

    target = tvm.target.Target({**host_llvm_target(), "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"})
    assert vector_lanes(target) == expected


AVX2_CASES = [c for c in CPU_CASES if c[0] in (
    "dense-1x1-pointwise-7x7", "grouped-g4-stride2-odd", "grouped-g32-resnext-like", "depthwise",
    "depthwise-stride2-odd", "residual-add-relu")]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "kind"), [c[1:3] for c in AVX2_CASES], ids=[c[0] for c in AVX2_CASES]
)
def test_avx2_build_matches_onnxruntime(kwargs, kind):
    """The haswell (AVX2) tiles, whatever this machine's widest vectors: 8 lanes, 16 registers."""
    from gconv_compile.targets import cpu_flags

    if not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    model = conv_model(**kwargs)
    vm, decisions = compile_cpu(model, mcpu="haswell")
    (conv,) = conv_decisions(decisions)
    assert conv.schedule == f"cpu-{kind}-conv" and "8 lanes" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=11), vm)
    assert_close(out, ref, F32)


def test_batch_norm_lands_in_the_conv_epilogue_without_a_divide():
    """BN decomposed for inference, its constant divisor turned into a multiplier: one conv
    function with the whole BN in its epilogue, no separate BN function, no vector divide
    (weights passed as inputs: with constant weights the BN folds into them,
    ``test_fold_batch_norm``)."""
    model = conv_model(16, 16, (8, 8), group=4, epilogue="bn", weight_as_input=True)
    vm, decisions = compile_cpu(model)
    (conv,) = conv_decisions(decisions)
    assert "multiply" in conv.function and "divide" not in conv.function, conv.function
    assert not any("batch_norm" in d.function for d in decisions), [d.line() for d in decisions]
    out, ref = run_both(model, random_feeds(model, seed=12), vm)
    assert_close(out, ref, F32)


def test_symbolic_batch_runs_batch_3():
    model = conv_model(16, 32, (6, 6), group=4, batch="N")
    vm, decisions = compile_cpu(model)
    assert len(conv_decisions(decisions)) == 1, [d.line() for d in decisions]
    out, ref = run_both(model, random_feeds(model, seed=2, batch=3), vm)
    assert out.shape[0] == 3
    assert_close(out, ref, F32)


def test_weight_passed_as_input_is_not_packed():
    model = conv_model(32, 64, (6, 6), group=4, weight_as_input=True)
    vm, decisions = compile_cpu(model, form="channel")
    convs = conv_decisions(decisions)
    assert len(convs) == 1
    assert "packed" not in convs[0].detail and "pixel form" in convs[0].detail
    out, ref = run_both(model, random_feeds(model, seed=3), vm)
    assert_close(out, ref, F32)


def test_shared_function_packs_every_call_site():
    # two same-shape convs: legalisation gives them one PrimFunc; both weights must be packed
    model = conv_model(32, 32, (6, 6), group=2, repeat=2)
    vm, decisions = compile_cpu(model, form="channel")
    convs = conv_decisions(decisions)
    assert len(convs) == 1 and "packed" in convs[0].detail, [d.line() for d in decisions]
    out, ref = run_both(model, random_feeds(model, seed=4), vm)
    assert_close(out, ref, F32)


def test_non_conv_functions_get_the_fallback():
    nodes = [
        helper.make_node("MaxPool", ["X"], ["P"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Relu", ["P"], ["Y"]),
    ]
    model = make_model(
        nodes,
        [tensor_info("X", [1, 8, 10, 10])],
        [helper.make_tensor_value_info("Y", F32, [None] * 4)],
    )
    vm, decisions = compile_cpu(model)
    assert decisions and not conv_decisions(decisions)
    assert all(d.schedule in ("llvm-fallback", "none") for d in decisions)
    assert "no reduction block" in " ".join(d.detail for d in decisions) or any(
        "reduction" in d.detail for d in decisions
    )
    out, ref = run_both(model, random_feeds(model, seed=5), vm)
    assert_close(out, ref, F32)


@pytest.mark.parametrize(
    ("k", "n", "trans_b", "expected"),
    [(544, 1000, 1, "matmul 1000 outputs"), (32, 64, 0, "matmul 64 outputs"),
     (16, 6, 1, "parallel outer loops")],
    ids=["classifier-1000", "gemm-64", "6-outputs-no-vector"],
)  # fmt: skip
def test_classifier_matmul_runs_vectors_along_outputs(k, n, trans_b, expected):
    r = rng(9)
    w = r.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    model = make_model(
        [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=trans_b)],
        [tensor_info("X", [1, k])],
        [helper.make_tensor_value_info("Y", F32, [None, None])],
        [init("W", w), init("B", r.standard_normal(n).astype(np.float32))],
    )
    vm, decisions = compile_cpu(model)
    (matmul,) = [d for d in decisions if "matmul" in d.function]
    assert expected in matmul.detail, matmul.line()
    out, ref = run_both(model, {"X": r.standard_normal((1, k)).astype(np.float32)}, vm)
    assert_close(out, ref, F32)


def test_channel_shuffle_and_sum_are_inlined_into_one_pass():
    """ShuffleNet's Relu -> Reshape -> Transpose -> Reshape, and ONNX Sum (which the importer
    writes broadcast -> stack -> sum): one block each after inlining, same numbers."""
    shape = [1, 12, 5, 7]
    nodes = [
        helper.make_node("Relu", ["X"], ["R"]),
        helper.make_node("Reshape", ["R", "s5"], ["G"]),
        helper.make_node("Transpose", ["G"], ["T"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["T", "s4"], ["S"]),
        helper.make_node("Sum", ["S", "X"], ["Y"]),
    ]
    inits = [init("s5", np.array([1, 3, 4, 5, 7], np.int64)), init("s4", np.array(shape, np.int64))]
    model = make_model(
        nodes, [tensor_info("X", shape)], [helper.make_tensor_value_info("Y", F32, shape)], inits
    )
    vm, decisions = compile_cpu(model)
    assert any("block(s) inlined" in d.detail for d in decisions), [d.line() for d in decisions]
    assert all(d.schedule == "llvm-fallback" for d in decisions), [d.line() for d in decisions]
    # Sum(a, b) is an add (fused with what follows), not a stack and a reduction
    names = [d.function for d in decisions]
    assert not any("stack" in n or "sum" in n for n in names) and any("add" in n for n in names)
    out, ref = run_both(model, random_feeds(model, seed=10), vm)
    assert_close(out, ref, F32)


# ------------------------------------------------------------------------------- CUDA (build only)


def _cuda_compiler() -> str | None:
    import shutil

    try:
        import cuda.bindings.nvrtc  # noqa: F401

        return "nvrtc"
    except ImportError:
        return "nvcc" if shutil.which("nvcc") else None


def chain_model(dtype: int = F32):
    """grouped 3x3 (g=8) -> depthwise 3x3 -> dense 1x1, each with bias and Relu."""
    r = rng(7)
    np_t = NP[dtype]
    specs = [("grouped", 32, 32, 8, 3), ("depthwise", 32, 32, 32, 3), ("dense", 32, 16, 1, 1)]
    nodes, inits, x = [], [], "X"
    for name, c_in, c_out, group, k in specs:
        inits.append(
            init(f"{name}_w", r.standard_normal((c_out, c_in // group, k, k)).astype(np_t))
        )
        inits.append(init(f"{name}_b", r.standard_normal(c_out).astype(np_t)))
        nodes.append(helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [f"{name}_c"], group=group,
                                      kernel_shape=[k, k], pads=[k // 2] * 4))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"{name}_c"], [f"{name}_y"]))
        x = f"{name}_y"
    outputs = [helper.make_tensor_value_info(x, dtype, [None] * 4)]
    return make_model(nodes, [tensor_info("X", [1, 32, 20, 20], dtype)], outputs, inits)


def _kernels(source: str) -> dict[str, str]:
    """Kernel name -> body, from TVM's CUDA C (each kernel is declared once, then defined)."""
    bodies: dict[str, str] = {}
    for chunk in source.split('extern "C" __global__')[1:]:
        head, _, body = chunk.partition("{")
        name = re.findall(r"(\w+)\s*\(", head)[-1]  # after __launch_bounds__(N)
        if body:
            bodies[name] = body
    return bodies


@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_cuda_grouped_and_depthwise_use_shared_memory(dtype, monkeypatch):
    compiler = _cuda_compiler()
    if compiler is None:
        pytest.skip("no CUDA compiler (nvcc or cuda-bindings NVRTC) to build with")
    if compiler == "nvcc":
        monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    decisions: list = []
    mod = from_onnx(chain_model(dtype))
    executable = tvm.compile(
        mod, target, relax_pipeline=tvm_schedules.relax_pipeline(target, decisions=decisions)
    )
    forms = {d.function: d.schedule for d in decisions}
    assert sorted(forms.values()) == ["cuda-depthwise-spatial", "cuda-grouped-igemm", "dlight"], (
        forms
    )
    sources = []

    def walk(module):
        for sub in module.imports:
            if sub.kind == "cuda":
                sources.append(sub.inspect_source())
            walk(sub)

    walk(executable.mod)
    kernels = _kernels("\n".join(sources))
    for function, form in forms.items():
        body = next(b for name, b in kernels.items() if name.startswith(function))
        if form.startswith("cuda-"):
            assert "__shared__" in body, function
            assert "__syncthreads" in body, function


# ------------------------------------------------------------------------------- tuning


def test_apply_database_without_records_changes_nothing(tmp_path):
    target = tvm.target.Target(tvm_schedules.host_target())
    from tvm.relax.frontend.onnx import from_onnx

    with target:
        mod = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(
            from_onnx(conv_model(8, 8, (6, 6), group=2))
        )
    out, tuned = tvm_schedules.apply_database(mod, target, tmp_path / "empty")
    assert tuned == 0 and out is mod


@pytest.mark.slow
def test_tune_then_reuse_records(tmp_path):
    """Tune a tiny conv with 4 trials; a second tune of the same module measures nothing."""
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target(tvm_schedules.host_target())
    model = conv_model(8, 8, (6, 6), group=2)
    with target:
        mod = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(from_onnx(model))
    calls = []
    first = tvm_schedules.tune(
        mod, target, trials=4, db_dir=tmp_path, progress=lambda *a: calls.append(a)
    )
    assert first.tuned and first.trials > 0 and calls and calls[-1][0] == calls[-1][1]
    second = tvm_schedules.tune(mod, target, trials=4, db_dir=tmp_path)
    assert second.tuned == [] and second.trials == 0 and second.reused == first.tasks
    decisions: list = []
    pipeline = tvm_schedules.relax_pipeline(target, db_dir=str(tmp_path), decisions=decisions)
    from tvm import relax

    vm = relax.VirtualMachine(
        tvm.compile(from_onnx(model), target, relax_pipeline=pipeline), tvm.cpu()
    )
    # the record is applied only where it measured faster than the default schedule
    import json

    (verdict,) = json.loads((tmp_path / "default_vs_tuned.json").read_text()).values()
    (conv,) = [d for d in decisions if "conv" in d.function]
    if verdict["keep"] == "tuned":
        assert conv.schedule == "tuned", conv.line()
    else:
        assert "kept over the tuning record" in conv.detail, conv.line()
    out, ref = run_both(model, random_feeds(model, seed=6), vm)
    assert_close(out, ref, F32)


def _commit_unscheduled_record(mod, target, db_dir) -> None:
    """A tuning record whose schedule is no schedule at all (TVM's naive loops), claiming 1 us."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")
    (task,) = [t for t in ms.relax_integration.extract_tasks(mod, target) if "conv" in t.task_name]
    task_mod = task.dispatched[0]
    sch = s_tir.Schedule(task_mod)
    sch.get_loops(sch.get_child_blocks(sch.get_sblock("root"))[-1])  # a trace MetaSchedule keeps
    record = ms.database.TuningRecord(
        sch.trace,
        database.commit_workload(task_mod),
        run_secs=[1e-6],
        target=target,
        args_info=ms.arg_info.ArgInfo.from_prim_func(task_mod["main"]),
    )
    database.commit_tuning_record(record)


def _build_with_db(model, target, db_dir):
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    decisions: list = []
    pipeline = tvm_schedules.relax_pipeline(target, db_dir=str(db_dir), decisions=decisions)
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(from_onnx(model), target, relax_pipeline=pipeline)
    convs = [d for d in decisions if "conv" in d.function]
    return relax.VirtualMachine(executable, tvm.cpu()), convs


def test_a_record_slower_than_the_default_is_not_applied(tmp_path):
    """The record (naive loops) loses to the default schedule when measured: the build keeps
    the default. With the verdict flipped by hand, the same record is applied: the verdict, not
    the record's claimed 1 us, decides."""
    import json

    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target(tvm_schedules.host_target())
    model = conv_model(64, 64, (28, 28), group=4)
    with target:
        mod = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(from_onnx(model))
    _commit_unscheduled_record(mod, target, tmp_path)
    summary = tvm_schedules.tune(mod, target, trials=0, db_dir=tmp_path)
    assert summary.trials == 0 and len(summary.reused) == 1
    verdicts = json.loads((tmp_path / "default_vs_tuned.json").read_text())
    (verdict,) = verdicts.values()
    assert verdict["keep"] == "default" and verdict["tuned_us"] > 3 * verdict["default_us"] > 0
    vm, convs = _build_with_db(model, target, tmp_path)
    assert [d.schedule for d in convs] == ["cpu-grouped-conv"], [d.line() for d in convs]
    assert "kept over the tuning record" in convs[0].detail
    out, ref = run_both(model, random_feeds(model, seed=7), vm)
    assert_close(out, ref, F32)

    verdict["keep"] = "tuned"
    (tmp_path / "default_vs_tuned.json").write_text(json.dumps(verdicts))
    vm, convs = _build_with_db(model, target, tmp_path)
    assert [d.schedule for d in convs] == ["tuned"], [d.line() for d in convs]
    out, ref = run_both(model, random_feeds(model, seed=7), vm)
    assert_close(out, ref, F32)
