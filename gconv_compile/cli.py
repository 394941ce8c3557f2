"""The ``gconv-compile`` command line: options in, the library's functions called, lines out.

Each command is a pair ``_add_<command>`` (its options) and ``_run_<command>`` (the call into
the package); the decisions live in the package (which passes: ``targets``; the check:
``pipeline``; the build: ``build``; the comparison: ``verify``), not here.

Exit codes: 0 ok; 1 a numeric check failed (nothing written); 2 bad input or usage (one line on
stderr, nothing written); 3 an internal error (a bug: please report it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gconv_compile._version import __version__
from gconv_compile.build import compile as build
from gconv_compile.errors import CheckFailed, GconvError, UserError, one_line
from gconv_compile.explain import run_explain
from gconv_compile.files import write_json_atomic
from gconv_compile.library import CUDA_RUNTIME_NEEDS, write_bundle
from gconv_compile.model_io import check_output_path, load_model, save_model
from gconv_compile.passes import MIXCONV_MODES
from gconv_compile.pipeline import run_checked
from gconv_compile.profiles import builtin_profiles, load_profile
from gconv_compile.report import Report
from gconv_compile.targets import passes_for_target
from gconv_compile.verify import verify

logger = logging.getLogger("gconv_compile")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def _echo(line: str = "") -> None:
    print(line, flush=True)


def _write_report(report, path: str | None) -> None:
    if path:
        try:
            write_json_atomic(report.to_dict(), path)
        except OSError as exc:
            raise UserError(f"{path}: cannot write the report: {exc.strerror or exc}")


def _check_failed(failure: CheckFailed, report, report_path: str | None) -> int:
    """Show what the check measured, keep the JSON report, write nothing else: exit 1."""
    if report is not None:
        for line in report.lines():
            _echo(line)
        _write_report(report, report_path)
    print(f"gconv-compile: check failed: {failure}; nothing written", file=sys.stderr)
    return 1


def _check_report_path(path: str | None, inputs: Sequence[str]) -> None:
    if not path:
        return
    target = Path(path).resolve()
    for other in inputs:
        if other and Path(other).resolve() == target:
            raise UserError(f"{path}: report would overwrite '{other}'; choose another path")
    if not target.parent.is_dir():
        raise UserError(f"{path}: folder '{Path(path).parent}' does not exist")


def _add_check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    parser.add_argument(
        "--seeds", type=int, default=3, metavar="N", help="random input sets for the check (3)"
    )
    _add_shape_option(parser)


def _add_shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DIMS",
        help="size of an input with symbolic dims, e.g. x=1x3x224x224 (repeatable)",
    )


def parse_shapes(specs: Sequence[str] | None) -> dict[str, list[int]]:
    """The one ``--shape`` parser: ``name=1x3x224x224`` strings into a mapping."""
    overrides: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise UserError(f"--shape '{spec}': expected NAME=DIMxDIMx..., e.g. x=1x3x224x224")
        overrides[name] = [int(d) for d in dims.split("x")]
    return overrides


# ------------------------------------------------------------------------------- optimize


def _add_optimize(sub) -> None:
    p = sub.add_parser(
        "optimize",
        help="fold split-conv-concat blocks into grouped Convs",
        description="Fold Split/Slice -> N x Conv -> Concat blocks into one grouped Conv, check "
        "the result against the input with onnxruntime, and write it.",
    )
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--report", metavar="R.json", help="write the report as JSON")
    p.add_argument(
        "--target",
        metavar="PROFILE",
        help="a target profile (name or .json path): fold where it runs grouped convs, expand "
        "where it does not (see `gconv-compile profiles`)",
    )
    _add_mixconv_option(p)
    _add_check_options(p)


def _add_mixconv_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mixconv", choices=MIXCONV_MODES, default="auto",
        help="MixConv blocks (kernels that differ, embedded in the largest one when folded): "
        "auto folds them when the target's cost estimate says the result is not slower "
        "(default), always, never",
    )  # fmt: skip


def _run_optimize(args: argparse.Namespace) -> int:
    loaded = load_model(args.input)
    check_output_path(args.output, loaded)
    _check_report_path(args.report, [args.input, args.output])
    report = Report("optimize", input=args.input)
    plan = passes_for_target(
        "optimize", args.target, warnings=report.warnings, mixconv=args.mixconv
    )
    report.target = plan.target
    return _rewrite_and_save(args, loaded, plan, report)


def _rewrite_and_save(args, loaded, rewrite, report) -> int:
    """Shared tail of optimize/expand: rewrite, check, print, write (only if the check held)."""
    shapes = parse_shapes(args.shape)
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    try:
        model = run_checked(
            loaded, rewrite, report, check=not args.no_check,
            seeds=tuple(range(args.seeds)), shapes=shapes,
        )  # fmt: skip
    except CheckFailed as failure:
        return _check_failed(failure, report, args.report)
    save_model(model, args.output, loaded=loaded)
    report.output = args.output
    for line in report.lines():
        _echo(line)
    _write_report(report, args.report)
    return 0


# ------------------------------------------------------------------------------- explain


def _add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="explain the groups setting of a convolution, or of every Conv in a model",
        description="Explain what groups does: weight shape, channel wiring, cost against the "
        "dense conv, the equivalent split-conv-concat and each framework's name for it. Give a "
        "setting with --conv, or a model to list its convolutions, foldable blocks and "
        "depthwise-separable pairs.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL.onnx", help="describe this model")
    p.add_argument(
        "--conv",
        metavar="SPEC",
        help="a setting, e.g. in=16,out=16,groups=2,kernel=3x3 (keys: in, out, groups, kernel, "
        "stride, dilation, dims)",
    )
    p.add_argument("--transpose", action="store_true", help="the --conv setting is a ConvTranspose")
    p.add_argument("--node", metavar="NAME", help="with a model: explain this one Conv in detail")
    p.add_argument("--svg", metavar="FILE.svg", help="draw the channel wiring to FILE.svg")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def _run_explain(args: argparse.Namespace) -> int:
    text = run_explain(
        model=args.model,
        conv=args.conv,
        transpose=args.transpose,
        node=args.node,
        svg=args.svg,
        as_json=args.json,
    )
    _echo(text)
    return 0


# ------------------------------------------------------------------------------- expand


def _add_expand(sub) -> None:
    p = sub.add_parser(
        "expand",
        help="expand grouped Convs for targets that lack them",
        description="Expand Conv/ConvTranspose nodes with group > 1 into Split -> G Convs -> "
        "Concat (split) or one block-diagonal Conv (dense), check the result against the input "
        "with onnxruntime, and write it.",
    )
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument(
        "--mode",
        choices=("split", "dense"),
        help="split: Split -> G Convs -> Concat; dense: one Conv with a block-diagonal weight, "
        "G times the work (default: the target's preference, else split)",
    )
    p.add_argument(
        "--keep-depthwise",
        action="store_true",
        help="leave depthwise convs (group == C_in) grouped",
    )
    p.add_argument("--min-group", type=int, metavar="N", help="only expand group >= N")
    p.add_argument("--max-group", type=int, metavar="N", help="only expand group <= N")
    p.add_argument(
        "--skip", action="append", default=[], metavar="NAME",
        help="leave the node with this name alone (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--target",
        metavar="PROFILE",
        help="only expand what this target profile cannot run (name or .json path)",
    )
    p.add_argument("--report", metavar="R.json", help="write the report as JSON")
    _add_check_options(p)


def _run_expand(args: argparse.Namespace) -> int:
    report = Report("expand", input=args.input)
    plan = passes_for_target(
        "expand", args.target, mode=args.mode, keep_depthwise=args.keep_depthwise,
        min_group=args.min_group, max_group=args.max_group, skip=args.skip,
        warnings=report.warnings,
    )  # fmt: skip
    report.target = plan.target
    loaded = load_model(args.input)
    check_output_path(args.output, loaded)
    _check_report_path(args.report, [args.input, args.output])
    return _rewrite_and_save(args, loaded, plan, report)


# ------------------------------------------------------------------------------- profiles


def _add_profiles(sub) -> None:
    p = sub.add_parser(
        "profiles",
        help="list the target profiles for optimize/expand --target",
        description="List the built-in target profiles (or show one profile, built-in or from a "
        ".json file): what each target runs natively and how the rest is expanded.",
    )
    p.add_argument("profile", nargs="?", metavar="PROFILE", help="show only this profile")
    p.add_argument("--json", action="store_true", help="print JSON for machines")


def _run_profiles(args: argparse.Namespace) -> int:
    profiles = [load_profile(args.profile)] if args.profile else builtin_profiles()
    if args.json:
        _echo(json.dumps([profile.to_dict() for profile in profiles], indent=2))
        return 0
    width = max(len(profile.name) for profile in profiles) + 2
    for profile in profiles:
        _echo(f"{profile.name:<{width}}{profile.description}")
        _echo(f"{'':<{width}}{profile.capabilities()}")
    return 0


# ------------------------------------------------------------------------------- compile


def _add_compile(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="optimise and build a model with TVM for this CPU (llvm) or a CUDA GPU",
        description="Fold split-conv-concat blocks as the target's profile asks (checked with "
        "onnxruntime), import the model into TVM Relax (symbolic dims stay symbolic), build it "
        "and write a library that TVM's runtime alone runs from any process (gconv_compile.runtime."
        "load; `gconv-compile bundle` packs it), with OUT.so.json beside it (inputs, outputs, "
        "target, sha256 of the model). "
        "Check the library with `gconv-compile verify IN.onnx --lib OUT.so`.",
        epilog=CUDA_RUNTIME_NEEDS,
    )
    p.add_argument("input", metavar="IN.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.so")
    p.add_argument(
        "--target", choices=("llvm", "cuda"), default="llvm",
        help="llvm: this CPU; cuda: NVIDIA GPUs, builds without one (default: llvm)",
    )  # fmt: skip
    p.add_argument(
        "--arch", metavar="sm_XY",
        help="CUDA architecture for code generation (default: the GPU here, else sm_80)",
    )  # fmt: skip
    _add_mixconv_option(p)
    p.add_argument(
        "--mcpu", metavar="CPU",
        help="LLVM CPU name (default: from /proc/cpuinfo: skylake-avx512, haswell or x86-64)",
    )  # fmt: skip
    p.add_argument("--no-optimize", action="store_true", help="build the model as it is")
    p.add_argument(
        "--emit-source", metavar="DIR",
        help="write the generated code to DIR: CUDA C (.cu) for cuda, LLVM IR (.ll) and "
        "assembly (.s) for llvm",
    )  # fmt: skip
    p.add_argument(
        "--tune-trials", type=int, default=0, metavar="N",
        help="spend N MetaSchedule measurements tuning the convolutions first (needs --tune-db)",
    )  # fmt: skip
    p.add_argument(
        "--tune-db", metavar="DIR",
        help="tuning records: kept here by --tune-trials, applied to the build when present; "
        "tasks with records are not tuned again",
    )  # fmt: skip
    p.add_argument(
        "--weights-file", metavar="W.npz",
        help="keep the weights out of the library, in this .npz or .safetensors file beside it "
        "(read when the library is loaded)",
    )  # fmt: skip
    p.add_argument("--report", metavar="R.json", help="write the report as JSON")
    _add_check_options(p)


class _ProgressBar:
    """A one-line progress bar with ETA on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str, width: int = 30) -> None:
        self.label = label
        self.width = width
        self.tty = sys.stderr.isatty()
        self.last_reported = -1

    def __call__(self, done: int, total: int, eta_s: float | None) -> None:
        total = max(total, 1)
        eta = "--" if eta_s is None else f"{int(eta_s) // 60}m{int(eta_s) % 60:02d}s"
        filled = int(self.width * min(done, total) / total)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total}, ETA {eta}"
        )
        if self.tty:
            print("\r" + line, end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done == total or done * 10 // total > self.last_reported:
            self.last_reported = done * 10 // total
            print(line, file=sys.stderr, flush=True)


def _run_compile(args: argparse.Namespace) -> int:
    _check_report_path(args.report, [args.input, args.output])
    shapes = parse_shapes(args.shape)
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    try:
        compiled = build(
            args.input, args.target, output=args.output, arch=args.arch, mcpu=args.mcpu,
            optimize=not args.no_optimize, check=not args.no_check,
            seeds=tuple(range(args.seeds)), shapes=shapes, emit_source=args.emit_source,
            tune_trials=args.tune_trials, tune_db=args.tune_db,
            tune_progress=_ProgressBar("tuning") if args.tune_trials else None,
            weights_file=args.weights_file, mixconv=args.mixconv,
        )  # fmt: skip
    except CheckFailed as failure:
        return _check_failed(failure, failure.report, args.report)
    report, info = compiled.report, compiled.info
    for line in report.lines():
        _echo(line)
    t = compiled.timings
    detail = ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in t.items())
    spec = info.target.get("host", info.target) if info.target_kind == "cuda" else info.target
    arch = info.target.get("arch") if info.target_kind == "cuda" else spec.get("mcpu", "")
    if "tuning" in report.extra:
        _echo(f"{'tuned':8} {report.extra['tuning']['summary'].removeprefix('tuning: ')}")
    for form in report.extra.get("conv_forms", []):
        _echo(f"{'form':8} {form['node']}: {form['form']} ({form['why']})")
    for decision in report.extra.get("schedules", []):
        if "conv" in decision["detail"] or decision["schedule"] == "tuned":
            _echo(
                f"{'schedule':8} {decision['function']}: {decision['schedule']} ({decision['detail']})"
            )
    _echo(f"{'compiled':8} {info.target_kind} ({arch}) in {sum(t.values()):.2f} s ({detail})")
    _echo(f"{'inputs':8} " + ", ".join(s.describe() for s in info.inputs))
    _echo(f"{'outputs':8} " + ", ".join(s.describe() for s in info.outputs))
    _echo(f"{'library':8} {compiled.library} (+ {compiled.library}.json)")
    if info.weights:
        _echo(f"{'weights':8} {len(info.weights['names'])} tensors in {args.weights_file}")
    if info.cuda_binary:
        where = (
            "embedded in the library"
            if info.cuda_binary.get("embedded")
            else (f"in {info.cuda_binary['file']}")
        )
        _echo(f"{'cuda':8} {info.cuda_binary['arch']} fatbin by nvcc, {where}")
    for path in compiled.sources:
        _echo(f"{'source':8} {path}")
    if info.target_kind == "cuda":
        _echo(f"{'note':8} {info.cuda_note or CUDA_RUNTIME_NEEDS}")
    _write_report(report, args.report)
    return 0


# ------------------------------------------------------------------------------- verify


def _add_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="compare a TVM build of a model with onnxruntime on the original model",
        description="Run the original model in onnxruntime (CUDA EP with TF32 off when the "
        "candidate runs on a GPU, else CPU EP) and the TVM library (--lib, or compiled now for "
        "--target) on the same inputs, and report per output the max/mean absolute error, max "
        "relative error and worst element. Exit 0 when every output is within tolerance, 1 when "
        "one is not, 2 for bad input (a missing library, one compiled from another model, a bad "
        ".npz, wrong shapes).",
        epilog="Calibrated default: each output may differ by max(atol, budget x its RMS) + "
        "rtol x |ref|, budget 2^-12 for float32 (4096 units of float32 roundoff: summation-order "
        "noise through a network as deep as ResNeXt-50); (atol, rtol) float32 1e-5, 1e-4 on CPU "
        "and 1e-4, 1e-3 on CUDA (fast math, other summation order); float16 1e-2, 1e-2; "
        "quantized int8/uint8 outputs may differ by one step, other integers not at all. --atol "
        "and --rtol override their part of the rule: an explicit --atol is used as given (not "
        "scaled by the RMS), an explicit --rtol replaces rtol, and a tolerance not given keeps "
        "its calibrated value (--atol 0 --rtol 0: bitwise equality). Each output's margin "
        "(error / allowed; above 1 fails) is printed and written to --report. "
        + CUDA_RUNTIME_NEEDS,
    )
    p.add_argument("input", metavar="IN.onnx", help="the original model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--lib", metavar="OUT.so", help="a library written by compile")
    which.add_argument(
        "--target", choices=("llvm", "cuda"),
        help="compile now for this target (default: cuda when a GPU is visible, else llvm)",
    )  # fmt: skip
    p.add_argument("--inputs", metavar="X.npz", help="inputs by name (default: seeded random)")
    p.add_argument(
        "--seeds", type=int, default=3, metavar="N", help="random input sets (default 3)"
    )
    p.add_argument(
        "--rtol", type=float, metavar="R",
        help="relative tolerance for every output (overrides the calibrated rtol)",
    )  # fmt: skip
    p.add_argument(
        "--atol", type=float, metavar="A",
        help="absolute tolerance for every output, used as given, not scaled by the output's RMS "
        "(overrides the calibrated atol)",
    )  # fmt: skip
    _add_shape_option(p)
    p.add_argument("--arch", metavar="sm_XY", help="CUDA architecture when compiling now")
    p.add_argument("--no-optimize", action="store_true", help="when compiling now: do not fold")
    p.add_argument(
        "--ignore-fingerprint", action="store_true",
        help="accept a library compiled from another file with the same inputs and outputs",
    )  # fmt: skip
    p.add_argument("--report", metavar="R.json", help="write the report as JSON")


def _run_verify(args: argparse.Namespace) -> int:
    _check_report_path(args.report, [args.input, args.lib or "", args.inputs or ""])
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise UserError(f"--{name} must be a number >= 0")
    result = verify(
        args.input, library=args.lib, target=args.target, inputs=args.inputs,
        seeds=tuple(range(args.seeds)), atol=args.atol, rtol=args.rtol,
        shapes=parse_shapes(args.shape), arch=args.arch,
        optimize=not args.no_optimize, ignore_fingerprint=args.ignore_fingerprint,
    )  # fmt: skip
    for line in result.lines():
        _echo(line)
    _write_report(result.report, args.report)
    return 0 if result.passed else 1


# ------------------------------------------------------------------------------- bundle


def _add_bundle(sub) -> None:
    p = sub.add_parser(
        "bundle",
        help="write what a machine that only runs a library needs (no TVM compiler)",
        description="Copy a compiled library, its sidecar, weights file and CUDA binaries into "
        "DIR with the loader (DIR/python/gconv_compile: numpy and tvm-ffi only), TVM's runtime "
        "library (DIR/runtime/libtvm_runtime.so; for CUDA also libtvm_runtime_cuda.so and "
        "libcudart.so.13) and the "
        "apache-tvm-ffi wheel for the target's Python (from --wheels, else pip download). "
        "See docs/deployment.md.",
    )
    p.add_argument("library", metavar="LIB.so")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="a new or empty folder")
    p.add_argument("--python", default="3.12", metavar="X.Y",
                   help="CPython version of the target machine (default 3.12)")  # fmt: skip
    p.add_argument("--wheels", metavar="DIR", help="look for the tvm-ffi wheel here first")


def _run_bundle(args: argparse.Namespace) -> int:
    size = write_bundle(args.library, args.output, python=args.python, wheels=args.wheels)
    _echo(f"bundle   {args.output}: {size / 2**20:.1f} MiB for Python {args.python}")
    _echo(f"{'run':8} PYTHONPATH={args.output}/python:<unpacked wheel> "
          f"GCONV_TVM_RUNTIME_DIR={args.output}/runtime python -c "
          f"\"from gconv_compile.runtime import load; print(load('{args.output}/"
          f"{Path(args.library).name}').input_names)\"")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------- main

_COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "optimize": (_add_optimize, _run_optimize),
    "expand": (_add_expand, _run_expand),
    "profiles": (_add_profiles, _run_profiles),
    "explain": (_add_explain, _run_explain),
    "compile": (_add_compile, _run_compile),
    "verify": (_add_verify, _run_verify),
    "bundle": (_add_bundle, _run_bundle),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gconv-compile",
        description="Fold, expand, compile and verify grouped convolutions in ONNX models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add, _run in _COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    debug = os.environ.get("GCONV_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        if not args.verbose:  # MetaSchedule logs every tuning round at INFO
            logging.getLogger("tvm").setLevel(logging.WARNING)
        return _COMMANDS[args.command][1](args)
    except GconvError as error:
        print(f"gconv-compile: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `gconv-compile ... | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("gconv-compile: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not bad input: one line, traceback on request
        if debug:
            raise
        print(
            f"gconv-compile: internal error: {type(error).__name__}: {one_line(error)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
