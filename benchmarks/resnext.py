"""TVM llvm (gconv_compile's schedules) against onnxruntime CPU: ResNeXt-50, MobileNetV2, ShuffleNet.

Run: ``python benchmarks/resnext.py [--cases ...] [--rounds 5] [--mcpu haswell]
[--tune-db DIR] [--markdown docs/performance.md]``

Cases (batch 1, float32, seeded random weights, BN folded; ``--cases`` picks groups):

- ``resnext``: ResNeXt-50 32x4d, 224x224, native (one ``Conv(group=32)`` per bottleneck); the
  branchy form (every grouped conv written ``Split -> 32 Conv -> Concat``) as onnxruntime runs
  it against TVM on what our fold pass makes of it; and TVM folded-branchy against TVM native;
  with ``--tune-db``, the native model with the tuning records of that folder applied;
- ``resnext-convs``: every distinct grouped 3x3 conv of ResNeXt-50 alone (conv + bias + Relu);
- ``mobilenet``, ``mobilenet-convs``: MobileNetV2 and each of its distinct depthwise convs;
- ``shufflenet``: ShuffleNet v1 from the onnx wheel's zoo, with seeded weights.

How it is timed: each runtime runs in a process of its own (``timing_worker.py``): onnxruntime
with ``intra_op_num_threads`` = usable cores, TVM through ``gconv_compile.load`` (every usable
core). The driver asks the two processes in turn for blocks of runs (~``--block-ms`` each, after
2 warm-up runs and a pause), ``--rounds`` times, and reports min and median of each side. Every
library is built once per (model, target, schedule source) and cached in ``--cache``; each TVM
output is checked against onnxruntime's (max |diff| / max |ref|).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "tests")]

from kernel_timing import Worker, machine_line, time_alternating  # noqa: E402
from mobilenet_model import build_mobilenet_v2, depthwise_convs  # noqa: E402
from resnext_model import build_resnext50, single_conv_model, stage_convs  # noqa: E402

from gconv_compile.files import write_text_atomic  # noqa: E402

GROUPS = ("resnext", "resnext-convs", "mobilenet", "mobilenet-convs", "shufflenet")


@dataclass
class Side:
    """One runtime's half of a row: 'ort' runs ``model``, 'tvm' runs its compiled library."""

    kind: str
    model: str  # key into Bench.models


@dataclass
class Case:
    name: str
    group: str
    first: Side
    second: Side
    ref: str  # the model whose onnxruntime output is the reference
    macs: float = 0.0
    notes: list[str] = field(default_factory=list)


def _conv_model(shape) -> onnx.ModelProto:
    """``single_conv_model`` with its output's shape written (the build's checker needs it)."""
    model = single_conv_model(shape)
    out = model.graph.output[0]
    dims = [1, shape.out_channels, shape.out_size, shape.out_size]
    out.CopyFrom(onnx.helper.make_tensor_value_info(out.name, onnx.TensorProto.FLOAT, dims))
    return model


def _models(groups: set[str]) -> dict[str, onnx.ModelProto]:
    models: dict[str, onnx.ModelProto] = {}
    if "resnext" in groups:
        models["resnext50"] = build_resnext50("grouped")
        models["resnext50_branchy"] = build_resnext50("branchy")
    if "resnext-convs" in groups:
        models.update({s.name: _conv_model(s) for s in stage_convs()})
    if "mobilenet" in groups:
        models["mobilenet_v2"] = build_mobilenet_v2()
    if "mobilenet-convs" in groups:
        models.update({s.name: _conv_model(s) for s in depthwise_convs()})
    if "shufflenet" in groups:
        from grouped_models import zoo_model

        models["shufflenet_v1"] = zoo_model("light_shufflenet")
    return models


def _cases(groups: set[str], tuned: bool) -> list[Case]:
    ort, tvm = (lambda m: Side("ort", m)), (lambda m: Side("tvm", m))
    cases = []
    if "resnext" in groups:
        cases.append(Case("ResNeXt-50 32x4d", "resnext", ort("resnext50"), tvm("resnext50"),
                          "resnext50"))  # fmt: skip
        if tuned:
            cases.append(Case("ResNeXt-50 32x4d, tuned", "resnext", ort("resnext50"),
                              tvm("resnext50@tuned"), "resnext50"))  # fmt: skip
        cases.append(Case("ResNeXt-50 branchy: ort as is, TVM folded", "resnext",
                          ort("resnext50_branchy"), tvm("resnext50_branchy"), "resnext50"))  # fmt: skip
        cases.append(Case("TVM folded branchy vs TVM native (first column)", "resnext",
                          tvm("resnext50"), tvm("resnext50_branchy"), "resnext50"))  # fmt: skip
    for group, shapes in (("resnext-convs", stage_convs), ("mobilenet-convs", depthwise_convs)):
        if group in groups:
            for s in shapes():
                cases.append(Case(f"{s.name} {s.in_channels}ch {s.size}px", group, ort(s.name),
                                  tvm(s.name), s.name, macs=s.macs))  # fmt: skip
    if "mobilenet" in groups:
        cases.append(Case("MobileNetV2", "mobilenet", ort("mobilenet_v2"), tvm("mobilenet_v2"),
                          "mobilenet_v2"))  # fmt: skip
    if "shufflenet" in groups:
        cases.append(Case("ShuffleNet v1 (onnx zoo)", "shufflenet", ort("shufflenet_v1"),
                          tvm("shufflenet_v1"), "shufflenet_v1"))  # fmt: skip
    return cases


class Bench:
    """Models on disk, their inputs, and their libraries (built once, cached)."""

    def __init__(self, models: dict, cache: Path, mcpu: str | None, tune_db: str | None) -> None:
        self.models, self.cache, self.mcpu, self.tune_db = models, cache, mcpu, tune_db
        self.cache.mkdir(parents=True, exist_ok=True)
        self.paths: dict[str, Path] = {}
        self.inputs: dict[str, Path] = {}
        self.schedules: dict[str, list[dict]] = {}
        self.libraries: dict[str, Path] = {}
        for name, model in models.items():
            data = model.SerializeToString()
            path = cache / f"{name}-{hashlib.sha256(data).hexdigest()[:12]}.onnx"
            if not path.exists():
                path.write_bytes(data)
            self.paths[name] = path
            self.inputs[name] = self._input(model, name)

    def _input(self, model: onnx.ModelProto, name: str) -> Path:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        shape = [d.dim_value or 1 for d in dims]
        path = self.cache / f"{name}-input.npy"
        np.save(path, np.random.default_rng(1).standard_normal(shape).astype(np.float32))
        return path

    def library(self, key: str) -> Path:
        """The compiled library of model ``key`` ('name' or 'name@tuned'), built if not cached.

        The cache key covers the model, the target and the sources that shape a CPU build (the
        build, the passes, the CPU schedules; the tuning code for a tuned build).
        """
        if key in self.libraries:
            return self.libraries[key]
        from gconv_compile.build import compile as build
        from gconv_compile.targets import host_llvm_target

        name, _, variant = key.partition("@")
        target = host_llvm_target(self.mcpu)
        package = ROOT / "gconv_compile"
        schedules = sorted((package / "tvm_schedules").glob("*.py"))
        sources = [package / "build.py", *sorted((package / "passes").rglob("*.py"))]
        sources += [p for p in schedules if p.name in ("__init__.py", "_conv.py")
                    or p.name.startswith("cpu")]  # fmt: skip
        if variant == "tuned":
            sources.append(package / "tvm_schedules" / "tuning.py")
        digest = hashlib.sha256(self.paths[name].read_bytes())
        digest.update(json.dumps(target, sort_keys=True).encode() + variant.encode())
        for src in sources:
            digest.update(src.read_bytes())
        lib = self.cache / f"{name}-{variant or 'default'}-{digest.hexdigest()[:12]}.so"
        if not lib.exists():
            print(f"building {key} for -mcpu={target['mcpu']} ...", file=sys.stderr, flush=True)
            tune_db = self.tune_db if variant == "tuned" else None
            built = build(self.paths[name], "llvm", mcpu=self.mcpu, output=lib, check=False,
                          tune_db=tune_db)  # fmt: skip
            sidecar = {"schedules": built.report.extra.get("schedules", [])}
            lib.with_suffix(".schedules.json").write_text(json.dumps(sidecar))
        info = json.loads(lib.with_suffix(".schedules.json").read_text())
        self.schedules[key] = info["schedules"]
        self.libraries[key] = lib
        return lib

    def artifact(self, side: Side) -> tuple[Path, Path]:
        name = side.model.partition("@")[0]
        path = self.paths[name] if side.kind == "ort" else self.library(side.model)
        return path, self.inputs[name]


def _reference(path: Path, input_npy: Path) -> np.ndarray:
    """onnxruntime's output, single-threaded in the driver (no pool left spinning here)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.load(input_npy)})[0]


def _notes(case: Case, bench: Bench) -> str:
    decisions = bench.schedules.get(case.second.model, [])
    convs = [d for d in decisions if d["schedule"].startswith("cpu-") and "conv" in d["schedule"]]
    if case.macs:
        detail = convs[0]["detail"].split(": ", 1)[-1] if convs else "not scheduled"
        return f"{case.macs / 1e6:.1f} MMAC; {detail}"
    unscheduled = [d for d in decisions if d["schedule"] == "none"]
    return f"{len(convs)} conv functions scheduled, {len(unscheduled)} left to TVM"


def run_case(case: Case, bench: Bench, workers: dict, args) -> tuple:
    """Time one case and check the TVM side's output; returns a table row."""
    both_tvm = case.first.kind == case.second.kind == "tvm"
    first = workers[case.first.kind]
    second = workers["tvm2" if both_tvm else case.second.kind]
    for worker, side in ((first, case.first), (second, case.second)):
        worker.load(*bench.artifact(side))
    a, b = time_alternating(first, second, rounds=args.rounds, block_s=args.block_ms / 1e3)
    out = Path(bench.cache) / "out.npy"
    second.request(op="save", out=str(out))
    ref = _reference(bench.paths[case.ref], bench.inputs[case.ref])
    got = np.load(out)
    err = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    row = (case.name, f"{a.min_ms:.3f}", f"{a.median_ms:.3f}", f"{b.min_ms:.3f}",
           f"{b.median_ms:.3f}", f"{b.min_ms / a.min_ms:.2f}x",
           f"{b.median_ms / a.median_ms:.2f}x", f"{err:.1e}", _notes(case, bench))  # fmt: skip
    print(" | ".join(row), flush=True)
    return row


HEADER = ("case", "ort min ms", "ort median ms", "TVM min ms", "TVM median ms",
          "TVM/ort min", "TVM/ort median", "rel. error", "notes")  # fmt: skip


def _table(rows: list[tuple], target: dict, argv: list[str], threads: dict) -> str:
    when = datetime.datetime.now().isoformat(timespec="minutes")
    lines = [
        f"Machine: {machine_line()}  ",
        f"Threads: onnxruntime {threads.get('ort', '-')}, TVM {threads.get('tvm', '-')}; "
        f"TVM target -mcpu={target.get('mcpu')}; onnxruntime picks its kernels by CPUID  ",
        f"Date: {when}  ",
        f"Command: `python benchmarks/resnext.py {' '.join(argv)}`",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_markdown(path: Path, block: str, mcpu: str) -> None:
    """Replace the text between ``mcpu``'s table markers in ``path`` (else append the block)."""
    start, end = f"<!-- cpu-table:{mcpu}:start -->", f"<!-- cpu-table:{mcpu}:end -->"
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{block}{end}{tail}"
    else:
        text = f"{text}{start}\n{block}{end}\n"
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two sides")
    parser.add_argument("--block-ms", type=float, default=150.0, help="length of one block")
    parser.add_argument("--mcpu", default=None, help="llvm CPU (default: this machine's)")
    parser.add_argument("--tune-db", default=None, help="add a row with these tuning records")
    parser.add_argument("--only", default=None, help="only cases whose name contains this")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "gconv-bench-cache"
    )
    parser.add_argument("--markdown", type=Path, help="write the table into this file")
    args = parser.parse_args(argv)
    from gconv_compile.targets import host_llvm_target

    groups = set(args.cases)
    bench = Bench(_models(groups), args.cache, args.mcpu, args.tune_db)
    cases = _cases(groups, bool(args.tune_db))
    cases = [c for c in cases if args.only is None or args.only in c.name]
    for case in cases:  # build everything before any timing
        for side in (case.first, case.second):
            bench.artifact(side)
    workers = {kind: Worker(kind.rstrip("2")) for kind in ("ort", "tvm", "tvm2")}
    rows = []
    try:
        print(machine_line(), flush=True)
        for case in cases:
            rows.append(run_case(case, bench, workers, args))
    finally:
        for worker in workers.values():
            worker.close()
    threads = {k: w.threads for k, w in workers.items() if w.threads}
    target = host_llvm_target(args.mcpu)
    block = _table(rows, target, argv, threads)
    print("\n" + block)
    if args.markdown:
        _write_markdown(args.markdown, block, target["mcpu"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
