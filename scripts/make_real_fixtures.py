"""Export small-width real architectures with both ONNX exporters into tests/fixtures/real/.

Usage (in a venv with torch 2.13.0, onnxscript, onnx 1.23 and onnxruntime; see
tests/fixtures/real/README.md)::

    python scripts/make_real_fixtures.py --out tests/fixtures/real           # fixtures + int8
    python scripts/make_real_fixtures.py --out tests/fixtures/real --manifest-only

Each architecture is written by hand in ``real_architectures.py`` beside this script (no
torchvision), seeded per model, in eval mode, with
random BatchNorm statistics and affine parameters, and exported twice with a dynamic batch:
``<name>_ts17.onnx`` (TorchScript exporter, opset 17) and ``<name>_dynamo18.onnx`` (torch.export
exporter, opset 18). Each file is checked with ``onnx.checker`` and compared in onnxruntime
(graph optimisations off) against eager PyTorch at another batch size. Some models are also
quantised to int8 with ``onnxruntime.quantization.quantize_static`` in three forms (QDQ per
channel, QDQ per tensor, QOperator), named ``<name>_<exporter>_qdq_pc|qdq_pt|qop.onnx``.

Last, ``manifest.json`` records for each fixture its ops, what the verdict of gconv-compile
SHOULD be (``expected``, judged by hand from the architecture) and what the current tool does
(``current``: ``optimize``, ``expand`` and ``optimize --target generic-npu``, run with the
project's virtualenv on gconv-compile as committed at HEAD), and the differences between the
two (``mismatches``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from make_torch_fixtures import (
    EXPORTERS,
    _randomise_batch_norm,
    _relative_stack_traces,
    op_counts,
    save_fixture,
)
from onnxruntime import quantization as ortq
from onnxruntime.quantization.shape_inference import quant_pre_process
from real_architectures import ARCHITECTURES, Architecture
from torch import nn

logger = logging.getLogger("make_real_fixtures")

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_FIXTURE_BYTES = 150_000
MAX_TOTAL_BYTES = 6_000_000
EXAMPLE_BATCH = 2  # torch.export specialises a dim of size 1, so the example batch is 2
CHECK_BATCH = 3
# float32 eager PyTorch vs onnxruntime: same maths, different summation order and fused BN,
# over at most a few thousand terms of O(1) values: differences of 1e-6..1e-5 are expected.
CHECK_ATOL = 1e-4
CHECK_RTOL = 1e-4
CALIBRATION_SAMPLES = 8
# int8 vs float: a handful of quantised layers; an error over a quarter of the output's range
# means the quantised model is broken, not merely rounded.
INT8_MAX_RELATIVE_ERROR = 0.25


# ---------------------------------------------------------------------------------------------
# Float fixtures


def _randomise_batch_norms(module: nn.Module) -> None:
    """Random running statistics and affine parameters, so folding a BatchNorm is not trivial."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            _randomise_batch_norm(child)


def _input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """onnxruntime CPU EP with graph optimisations off: the model runs as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _check_against_torch(model: onnx.ModelProto, module: nn.Module, shape, name: str) -> float:
    """Max abs difference of onnxruntime against eager PyTorch at another batch size."""
    x = _input((CHECK_BATCH, *shape), seed=1234)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    (actual,) = _session(model).run(None, {"x": x})
    if actual.shape != expected.shape:
        raise RuntimeError(f"{name}: output shape {actual.shape}, PyTorch gives {expected.shape}")
    error = float(np.max(np.abs(actual - expected)))
    if not np.allclose(actual, expected, atol=CHECK_ATOL, rtol=CHECK_RTOL):
        raise RuntimeError(f"{name}: onnxruntime differs from PyTorch by {error:.3g}")
    return error


def export_architecture(arch: Architecture, tag: str, out: Path, workdir: Path) -> Path:
    """Build ``arch`` from its seed, export it with exporter ``tag``, check and save it."""
    torch.manual_seed(arch.seed)
    module = arch.build()
    _randomise_batch_norms(module)
    module.eval()
    example = torch.randn((EXAMPLE_BATCH, *arch.input_shape))
    name = f"{arch.name}_{tag}.onnx"
    EXPORTERS[tag](module, example, workdir / name)
    model = onnx.load(str(workdir / name), load_external_data=True)
    _relative_stack_traces(model)
    save_fixture(model, out / name, MAX_FIXTURE_BYTES)
    error = _check_against_torch(model, module, arch.input_shape, name)
    logger.info("%s: %d bytes, max abs error vs PyTorch %.2g, ops %s",
                name, (out / name).stat().st_size, error, op_counts(model))  # fmt: skip
    return out / name


# ---------------------------------------------------------------------------------------------
# Int8 fixtures

QUANT_FORMATS = {
    "qdq_pc": dict(quant_format=ortq.QuantFormat.QDQ, per_channel=True),
    "qdq_pt": dict(quant_format=ortq.QuantFormat.QDQ, per_channel=False),
    # onnxruntime's x64 kernels want uint8 activations in the QOperator format.
    "qop": dict(quant_format=ortq.QuantFormat.QOperator, per_channel=True,
                activation_type=ortq.QuantType.QUInt8),
}  # fmt: skip


class _Calibration(ortq.CalibrationDataReader):
    """A few seeded random batches of one input named ``x``."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        self.batches = iter(
            {"x": _input((1, *shape), seed=seed * 100 + i)} for i in range(CALIBRATION_SAMPLES)
        )

    def get_next(self):
        return next(self.batches, None)


def quantize_fixture(float_path: Path, arch: Architecture, workdir: Path) -> list[Path]:
    """Write the three int8 forms of ``float_path`` beside it; check each runs in onnxruntime."""
    prepared = workdir / f"{float_path.stem}_prep.onnx"
    quant_pre_process(str(float_path), str(prepared))
    x = _input((CHECK_BATCH, *arch.input_shape), seed=4321)
    (reference,) = _session(float_path).run(None, {"x": x})
    written = []
    for suffix, options in QUANT_FORMATS.items():
        raw = workdir / f"{float_path.stem}_{suffix}.onnx"
        ortq.quantize_static(str(prepared), str(raw), _Calibration(arch.input_shape, arch.seed),
                             **options)  # fmt: skip
        target = float_path.with_name(raw.name)
        model = onnx.load(str(raw))
        save_fixture(model, target, MAX_FIXTURE_BYTES)
        (actual,) = _session(target).run(None, {"x": x})
        scale = float(np.max(np.abs(reference)))
        error = float(np.max(np.abs(actual - reference))) / scale
        if actual.shape != reference.shape or not error < INT8_MAX_RELATIVE_ERROR:
            raise RuntimeError(f"{target.name}: int8 differs from float by {error:.3g} of range")
        logger.info("%s: %d bytes, error vs float %.3f of range, ops %s",
                    target.name, target.stat().st_size, error, op_counts(model))  # fmt: skip
        written.append(target)
    return written


def make_fixtures(out: Path, names: set[str] | None = None) -> list[Path]:
    """Export every architecture (or those in ``names``) with both exporters, and int8 forms."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="real-fixtures-") as tmp:
        workdir = Path(tmp)
        for arch in ARCHITECTURES:
            if names and arch.name not in names:
                continue
            for tag in EXPORTERS:
                path = export_architecture(arch, tag, out, workdir)
                written.append(path)
                if arch.int8:
                    written += quantize_fixture(path, arch, workdir)
    total = sum(p.stat().st_size for p in out.glob("*.onnx"))
    if total > MAX_TOTAL_BYTES:
        raise RuntimeError(f"fixtures take {total} bytes, over {MAX_TOTAL_BYTES}")
    return written


# ---------------------------------------------------------------------------------------------
# Manifest: expected verdicts against what gconv-compile does now

TOOL_RUNS = {
    "optimize": ["optimize"],
    "expand": ["expand"],
    "generic_npu": ["optimize", "--target", "generic-npu"],
}
TOOL_SOURCES = ("gconv_compile", "passes")
QDQ_NOTE = (
    "int8 QDQ: the fold should see through the weight/bias DequantizeLinear and the Q/DQ pairs "
    "around each branch (exact: per-branch scales become per-axis scales); expand likewise"
)
QOP_NOTE = (
    "int8 QOperator: no fold (each QLinearConv branch has its own output scale, requantised by "
    "QLinearConcat; one QLinearConv cannot reproduce that); a grouped QLinearConv splits exactly "
    "(every group shares x/y scales), so expand and generic-npu should split it as in float"
)


def expected_verdict(arch: Architecture, quantization: str | None) -> dict:
    """The verdict for one fixture: the architecture's, adjusted for its int8 form."""
    verdict = dataclasses.asdict(arch.verdict)
    if quantization in ("qdq_pc", "qdq_pt"):
        verdict["why"] = f"{verdict['why']}; {QDQ_NOTE}"
    elif quantization == "qop":
        verdict.update(folds=0, groups=[], refusals=[], why=f"{verdict['why']}; {QOP_NOTE}")
    verdict["groups"] = list(verdict["groups"])
    verdict["refusals"] = list(verdict["refusals"])
    verdict["expand_splits"] = verdict["grouped"] + verdict["depthwise"]
    verdict["generic_npu_splits"] = verdict["grouped"]
    return verdict


@dataclasses.dataclass(frozen=True)
class Tool:
    """How to run gconv-compile: a Python with its dependencies, and where its source is."""

    python: Path
    source: Path  # the folder holding the gconv_compile package to import
    label: str  # "HEAD <commit>" or "working tree", for the manifest


def tool_at_head(python: Path, workdir: Path) -> Tool:
    """gconv-compile as committed at HEAD, unpacked into ``workdir``.

    Others edit the tool in this working tree; the manifest's ``current`` must describe a
    commit, not their half-done edits. The passes install as ``gconv_compile.passes``, which a
    link makes importable from the unpacked tree.
    """
    commit = _git("rev-parse", "HEAD").strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit, *TOOL_SOURCES],
                             capture_output=True, cwd=REPO_ROOT, check=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(workdir, filter="data")
    (workdir / "gconv_compile" / "passes").symlink_to("../passes")
    return Tool(python, workdir, f"HEAD {commit}")


def run_tool(tool: Tool, fixture: Path, args: list[str], workdir: Path) -> dict:
    """Run one gconv-compile command on ``fixture``; the facts of its report, or its error."""
    report_path = workdir / "report.json"
    report_path.unlink(missing_ok=True)
    command = [str(tool.python), "-m", "gconv_compile", *args[:1], str(fixture.resolve()),
               "-o", str(workdir / "out.onnx"), "--report", str(report_path), *args[1:]]  # fmt: skip
    # `python -m` puts the working directory first on sys.path: run from the source folder.
    env = {**os.environ, "PYTHONPATH": str(tool.source)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=tool.source, env=env,
                          check=False)  # fmt: skip
    result = {"exit_code": done.returncode}
    if done.returncode != 0 or not report_path.exists():
        lines = done.stderr.strip().splitlines()
        result["error"] = lines[-1] if lines else ""
        return result
    report = json.loads(report_path.read_text())
    result["rewrites"] = [
        {"pass": r["pass_name"], "anchor": r["anchor"], "summary": r["summary"],
         "group": r["details"].get("group")}
        for r in report["rewrites"]
    ]  # fmt: skip
    result["skipped"] = [{"anchor": s["anchor"], "reason": s["reason"]} for s in report["skipped"]]
    result["check_passed"] = report["summary"]["check_passed"]
    result["warnings"] = report.get("warnings", [])
    return result


def _count(run: dict, pass_prefix: str) -> int:
    return sum(1 for r in run.get("rewrites", ()) if r["pass"].startswith(pass_prefix))


def mismatches(expected: dict, current: dict) -> list[str]:
    """Where what the tool does now differs from the expected verdict, one line each."""
    found = []
    for command, run in current.items():
        if run["exit_code"] != 0:
            found.append(f"{command}: exit {run['exit_code']}: {run.get('error', '')}")
            continue
        if run["check_passed"] is False:
            found.append(f"{command}: check failed")
    opt, exp, npu = current["optimize"], current["expand"], current["generic_npu"]
    if opt["exit_code"] == 0:
        groups = sorted(r["group"] for r in opt["rewrites"] if r["pass"].startswith("fold"))
        if len(groups) != expected["folds"] or groups != sorted(expected["groups"]):
            found.append(f"optimize: folded {len(groups)} block(s) {groups}, expected "
                         f"{expected['folds']} {sorted(expected['groups'])}")  # fmt: skip
        found += _unmatched_refusals(expected["refusals"], [s["reason"] for s in opt["skipped"]])
    if exp["exit_code"] == 0 and _count(exp, "expand") != expected["expand_splits"]:
        found.append(f"expand: split {_count(exp, 'expand')} conv(s), expected "
                     f"{expected['expand_splits']}")  # fmt: skip
    if npu["exit_code"] == 0:
        splits, folds = _count(npu, "expand"), _count(npu, "fold")
        if splits != expected["generic_npu_splits"] or folds:
            found.append(f"generic-npu: split {splits}, folded {folds}; expected split "
                         f"{expected['generic_npu_splits']}, folded 0")  # fmt: skip
    return found


def _unmatched_refusals(refusals: list[str], reasons: list[str]) -> list[str]:
    """Each expected refusal needs a skip reason of its own that contains one of its
    ``|``-separated alternatives."""
    left, found = list(reasons), []
    for refusal in refusals:
        match = next((r for r in left if any(alt in r for alt in refusal.split("|"))), None)
        if match is None:
            found.append(f"optimize: no skip reason contains {refusal!r} (got {reasons})")
        else:
            left.remove(match)
    return found


def _fixture_facts(path: Path) -> dict:
    model = onnx.load(str(path))
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "ir_version": model.ir_version,
        "opset": opsets["ai.onnx"],
        "ops": op_counts(model),
    }


def _fixtures(out: Path) -> list[tuple[Path, Architecture, str, str | None]]:
    """(path, architecture, exporter tag, quantization) of every fixture, in a stable order."""
    rows = []
    for arch in ARCHITECTURES:
        for tag in EXPORTERS:
            rows.append((out / f"{arch.name}_{tag}.onnx", arch, tag, None))
            if arch.int8:
                rows += [(out / f"{arch.name}_{tag}_{q}.onnx", arch, tag, q) for q in QUANT_FORMATS]
    return rows


def write_manifest(out: Path, python: Path, worktree: bool = False) -> dict:
    """Run gconv-compile on every fixture in ``out`` and write ``out/manifest.json``."""
    entries = {}
    with tempfile.TemporaryDirectory(prefix="real-manifest-") as tmp:
        runs, source = Path(tmp) / "runs", Path(tmp) / "source"
        runs.mkdir()
        source.mkdir()
        tool = Tool(python, REPO_ROOT, "working tree") if worktree else tool_at_head(python, source)
        for path, arch, tag, quantization in _fixtures(out):
            expected = expected_verdict(arch, quantization)
            current = {key: run_tool(tool, path, args, runs) for key, args in TOOL_RUNS.items()}
            entries[path.name] = {
                "architecture": arch.name, "exporter": tag, "quantization": quantization,
                "source": f"{arch.name}_{tag}.onnx" if quantization else None,
                **_fixture_facts(path), "expected": expected, "current": current,
                "mismatches": mismatches(expected, current),
            }  # fmt: skip
            logger.info("%s: %s", path.name, entries[path.name]["mismatches"] or "as expected")
    manifest = {
        "generator": "scripts/make_real_fixtures.py",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxscript": _version("onnxscript"), "onnxruntime": ort.__version__},
        "current_from": {"gconv_compile": tool.label, "commands": TOOL_RUNS},
        "fixtures": entries,
    }  # fmt: skip
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (out / "manifest.json").write_text(text)
    return manifest


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          check=True).stdout  # fmt: skip


def _version(package: str) -> str:
    return importlib.metadata.version(package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/real")
    parser.add_argument("--only", action="append", help="only this architecture (repeatable)")
    parser.add_argument("--manifest-only", action="store_true", help="rerun the tool, no export")
    parser.add_argument("--no-manifest", action="store_true", help="export only")
    parser.add_argument(
        "--gconv-python",
        type=Path,
        default=REPO_ROOT / ".venv/bin/python",
        help="the Python of a venv with gconv-compile installed",
    )
    parser.add_argument(
        "--tool-from-worktree",
        action="store_true",
        help="run gconv-compile from the working tree, not from HEAD",
    )
    args = parser.parse_args(argv)
    # onnxscript's optimiser and the quantiser log every step at INFO; only this script's lines.
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    if not args.manifest_only:
        written = make_fixtures(args.out, set(args.only or ()))
        print(f"wrote {len(written)} fixtures to {args.out}")
    if not args.no_manifest:
        manifest = write_manifest(args.out, args.gconv_python, args.tool_from_worktree)
        wrong = sum(1 for entry in manifest["fixtures"].values() if entry["mismatches"])
        print(f"manifest: {len(manifest['fixtures'])} fixtures, {wrong} not as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
