"""Default schedules and MetaSchedule tuning for convolutions compiled with TVM.

Integration contract for ``gconv_compile/build.py``
===================================================

The whole Relax pipeline in one call (replaces ``relax_pipeline="default"``)::

    from gconv_compile import tvm_schedules

    decisions = []                                  # one Decision per PrimFunc, for the report
    if tune_trials:                                 # optional, before the build
        with target:
            fused = tvm.transform.Sequential(tvm_schedules.legalize_and_fuse(target))(mod)
        summary = tvm_schedules.tune(fused, target, trials=tune_trials, db_dir=tune_db,
                                     progress=on_progress)   # on_progress(done, total, eta_s)
    pipeline = tvm_schedules.relax_pipeline(target, db_dir=tune_db, decisions=decisions)
    executable = tvm.compile(mod, target, relax_pipeline=pipeline)

``relax_pipeline`` runs, in this order, under ``with target``:

1. ``legalize_and_fuse``: library dispatch, ``fold_batch_norm`` (batch norm after a conv
   with constant weights folded into them), DecomposeOpsForInference (any other batch norm as
   elementwise arithmetic), LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
   (fusion is what puts bias / BN / activation / residual add into the conv);
2. ``apply_database(mod, target, db_dir)`` when ``db_dir`` is given (no-op without records;
   a record whose task our default schedule ran faster, as ``tune`` measured, is not applied:
   that function keeps the default and its decision says so);
3. ``schedule_module(mod, target)``: our schedules, before any dlight rule;
4. for GPU targets, dlight's defaults (Matmul, GEMV, Reduction, GeneralReduction, Fallback);
   they skip the functions steps 2-3 marked ``tirx.is_scheduled``;
5. TVM's dataflow lowering and finalisation passes.

- ``Decision`` has ``.function``, ``.schedule`` (``cpu-{dense,grouped,depthwise}-conv``,
  ``llvm-fallback``, ``cuda-grouped-igemm``, ``cuda-depthwise-spatial``, ``dlight``, ``tuned``,
  ``none``) and ``.detail`` (the conv, the form and tile chosen, or why it was left alone);
  ``.line()`` for the console, ``.to_dict()`` for ``--report``.
- On llvm every conv2d (dense, grouped, depthwise; any fused elementwise epilogue) is
  scheduled; the other functions get their outer loops parallelised. A conv whose weights are
  constants may get them repacked (output-channel vectors): the constants in the Relax main
  function are replaced by packed copies, so the compiled library's interface does not change.
  Weights bound as parameters (``keep_params_in_input``) are never repacked. Inside inverted
  residual blocks the two inner tensors may run NCHW{v}c (``cpu_nchwc``; ``GCONV_NCHWC=0``
  turns it off); the functions' signatures change, the library's interface does not.
- On cuda grouped and depthwise convs get shared-memory schedules; dense convs and the rest
  are left to dlight (Matmul rule; tensor cores in float16).
- The vector width follows the target's ``mcpu`` (LLVM's CPU tables); any llvm target works,
  ``host_target()`` names this machine's CPU.
- ``tune`` writes ``db_dir/database_{workload,tuning_record}.json`` and skips tasks already
  measured there, so a second compile with the same ``db_dir`` tunes nothing and reuses the
  records. It returns a ``TuneSummary`` (``.line()``). Use a CUDA tag target
  (``nvidia/nvidia-h100``) to tune CUDA, on a machine with that GPU.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import tvm
from tvm import tirx
from tvm.target import Target

from .cpu import host_target
from .cuda_accumulate import accumulate_grouped_conv_in_float32
from .fold_batch_norm import fold_batch_norm
from .tuning import apply_database, kept_defaults, tune

logger = logging.getLogger(__name__)

__all__ = [
    "Decision",
    "apply_database",
    "host_target",
    "legalize_and_fuse",
    "relax_pipeline",
    "schedule_module",
    "tune",
]


def legalize_and_fuse(target: Target) -> list:
    """The passes that produce the module ``schedule_module`` and ``tune`` work on."""
    from tvm import relax

    return [
        *relax.pipeline.library_dispatch_passes(target),
        # batch norm after a conv with constant weights folded into them (fold_batch_norm)
        fold_batch_norm,
        # batch_norm as its inference arithmetic (elementwise): FuseOps then puts it into the
        # conv's epilogue; legalised whole it is a separate 12-block function per BN (ShuffleNet
        # v1 ran 9x slower than onnxruntime that way)
        relax.transform.DecomposeOpsForInference(),
        *_llvm_rewrites(target),
        *_cuda_rewrites(target),
        relax.transform.LegalizeOps(customize_legalize_map=_legalize_map(target)),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _llvm_rewrites(target: Target) -> list:
    """Constant folding, then ``cpu_relax``'s rewrites (divide by a constant, stacked Sum)."""
    from tvm import relax

    from .cpu_relax import cpu_relax_rewrites

    if target.kind.name != "llvm":
        return []
    return [
        relax.transform.FoldConstant(),
        cpu_relax_rewrites,
        relax.transform.DeadCodeElimination(),
    ]


def _legalize_map(target: Target) -> dict | None:
    """float16 grouped convs on CUDA may take the tensor-core form (``cuda_tensorcore``)."""
    from . import cuda_tensorcore

    if target.kind.name == "cuda" and cuda_tensorcore.applies(target):
        return {"relax.nn.conv2d": cuda_tensorcore.legalize_conv2d}
    return None


def _cuda_rewrites(target: Target) -> list:
    """float16 grouped and depthwise convs accumulate in float32, as cuDNN's do."""
    return [accumulate_grouped_conv_in_float32] if target.kind.name == "cuda" else []


def relax_pipeline(
    target: Target | dict | str,
    *,
    db_dir: str | None = None,
    decisions: list | None = None,
    form: str | None = None,
) -> tvm.transform.Pass:
    """The whole Relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)``.

    Legalise and fuse, apply tuned records from ``db_dir`` (if given), apply our schedules,
    then dlight's defaults for what is left on GPUs, then TVM's lowering and finalisation.

    Args:
        target: The compile target.
        db_dir: A MetaSchedule database directory written by ``tune`` (optional).
        decisions: A list that receives one ``Decision`` per PrimFunc (for the report).
        form: Prefer this CPU schedule form where it applies (tests use it).
    """
    from tvm import relax

    target = Target(target) if not isinstance(target, Target) else target

    @tvm.transform.module_pass(opt_level=0, name="GconvRelaxPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            mod = tvm.transform.Sequential(legalize_and_fuse(target))(mod)
            kept = {}
            if db_dir is not None:
                kept = kept_defaults(mod, target, db_dir)
                mod, tuned = apply_database(mod, target, db_dir)
                logger.info("%d function(s) from the tuning database", tuned)
            mod, made = schedule_module(mod, target, form=form)
            for decision in made:
                verdict = kept.get(decision.function)
                if verdict is not None:
                    decision.detail += (
                        f"; kept over the tuning record (default {verdict['default_us']} us, "
                        f"tuned {verdict['tuned_us']} us)"
                    )
            if decisions is not None:
                decisions.extend(made)
            if target.kind.name != "llvm":
                from tvm.s_tir import dlight as dl

                mod = dl.ApplyDefaultSchedule(
                    dl.gpu.Matmul(),
                    dl.gpu.GEMV(),
                    dl.gpu.Reduction(),
                    dl.gpu.GeneralReduction(),
                    dl.gpu.Fallback(),
                )(mod)
            # relax.pipeline.dataflow_lower_passes(llvm) fails in TVM 0.27 (not exported by
            # backend.cpu_generic); these are its passes, the same for every target.
            lower = [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
            ]
            mod = tvm.transform.Sequential(lower + relax.pipeline.finalize_passes(target))(mod)
        return mod

    return _pipeline


@dataclass
class Decision:
    """What happened to one PrimFunc."""

    function: str
    schedule: str  # e.g. 'cpu-conv', 'cpu-parallel', 'cuda-grouped-igemm', 'tuned', 'none'
    detail: str

    def line(self) -> str:
        return f"{self.function}: {self.schedule} ({self.detail})"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_scheduled(func) -> bool:
    return bool(
        func.attrs is not None
        and "tirx.is_scheduled" in func.attrs
        and func.attrs["tirx.is_scheduled"]
    )


def schedule_module(
    mod: tvm.IRModule, target: Target | dict | str, *, form: str | None = None
) -> tuple[tvm.IRModule, list[Decision]]:
    """Apply the default conv schedules to every PrimFunc of a legalised, fused module.

    Where the CPU schedule wants the weights of a conv packed (output-channel vectors), and every
    call passes the weight as a constant, the constants in the Relax functions are replaced by
    packed copies (weights kept as function parameters are never repacked).

    Args:
        mod: The module after LegalizeOps/FuseOps/FuseTIR (and, optionally, a tuning database).
        target: An llvm or cuda target.
        form: Prefer this CPU schedule form ('pixel' or 'channel') where it applies; for tests.

    Returns:
        The scheduled module and one Decision per PrimFunc.
    """
    target = Target(target) if not isinstance(target, Target) else target
    kind = target.kind.name
    if kind == "llvm":
        from . import cpu as backend
    elif kind == "cuda":
        from . import cuda as backend
    else:
        return mod, [Decision(str(gv.name_hint), "none", f"no schedules for target {kind}")
                     for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]  # fmt: skip
    calls = _call_sites(mod)
    decisions: list[Decision] = []
    updates, packings = {}, {}
    with target:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            name = str(gv.name_hint)
            if _is_scheduled(func):
                decisions.append(Decision(name, "tuned", "schedule from the tuning database"))
                continue
            const_params = _constant_params(func, calls.get(name, []))
            try:
                new, form_done, why, packing = backend.schedule_conv(
                    func, target, constant_params=const_params, form=form
                )
            except RuntimeError as err:  # ScheduleError and the FFI errors derive from it
                # A function in a form the matcher does not know (no root block, say) keeps
                # TVM's own lowering; a schedule we cannot apply must never fail the build.
                first = (str(err).strip().splitlines() or [""])[0][:200]
                decisions.append(Decision(name, "none", f"not scheduled: {first}"))
                continue
            if new is not None:
                updates[gv] = new
                why += _record_packing(packings, name, func, packing)
                decisions.append(Decision(name, form_done, why))
                continue
            fallback, why_fb, packing = backend.schedule_fallback(
                func, target, constant_params=const_params
            )
            if fallback is not None:
                updates[gv] = fallback
                why_fb += _record_packing(packings, name, func, packing)
                decisions.append(Decision(name, f"{kind}-fallback", f"{why}; {why_fb}"))
            elif kind == "cuda":
                decisions.append(Decision(name, "dlight", why))
            else:
                decisions.append(Decision(name, "none", f"{why}; {why_fb}"))
    original = mod
    if updates:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in updates.items():
            mod[gv] = func
    if kind == "llvm" and form is None and _nchwc_enabled():
        mod = _nchwc_islands(mod, original, target, decisions, calls, packings)
    if packings:
        mod = _pack_constants(mod, packings)
    for d in decisions:
        logger.debug("%s", d.line())
    return mod, decisions


_CALL_TIR = None


def _call_tir_op():
    global _CALL_TIR
    if _CALL_TIR is None:
        _CALL_TIR = tvm.ir.Op.get("relax.call_tir")
    return _CALL_TIR


def _call_sites(mod: tvm.IRModule) -> dict[str, list]:
    """PrimFunc name -> the argument lists of every ``call_tir`` to it."""
    from tvm import relax

    sites: dict[str, list] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(_call_tir_op()):
            callee = expr.args[0]
            if isinstance(callee, tvm.ir.GlobalVar):
                sites.setdefault(str(callee.name_hint), []).append(list(expr.args[1].fields))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return sites


def _constant_params(func: tirx.PrimFunc, sites: list) -> frozenset[str]:
    """Names of ``func``'s parameters that every call site passes as a Relax constant."""
    if not sites:
        return frozenset()
    names = [str(p.name) for p in func.params]
    return frozenset(
        names[i] for i in range(len(names))
        if all(i < len(args) and isinstance(args[i], tvm.ir.expr.Constant) for args in sites)
    )  # fmt: skip


def _nchwc_islands(mod, original, target, decisions, calls, packings) -> tvm.IRModule:
    """``cpu_nchwc``'s islands; the depthwise convs' weight packings go into ``packings``."""
    from .cpu_nchwc import apply_islands

    mod, packed, clones = apply_islands(
        mod, original, target, decisions,
        lambda name: _constant_params(original[name], calls.get(name, [])),
    )  # fmt: skip
    by_name = {d.function: d for d in decisions}
    for name, (func, packing) in packed.items():
        by_name[name].detail += _record_packing(packings, name, func, packing)
    for clone, name in clones.items():
        if clone not in packings and name in packings:
            packings[clone] = packings[name]
    return mod


def _nchwc_enabled() -> bool:
    """NCHWc islands (``cpu_nchwc``) unless ``GCONV_NCHWC=0``."""
    import os

    return os.environ.get("GCONV_NCHWC", "1") != "0"


def _record_packing(packings: dict, name: str, func: tirx.PrimFunc, packing) -> str:
    """Note a schedule's weight packing for ``_pack_constants``; the decision line's words."""
    if packing is None:
        return ""
    names = [str(p.name) for p in func.params]
    packings[name] = (names.index(packing.param), packing)
    return f"; {packing.describe()}"


def _pack_constants(mod: tvm.IRModule, packings: dict) -> tvm.IRModule:
    """Replace the weight constants of every call to a packed function by their packed copy.

    The packed functions get fresh GlobalVars: a GlobalVar carries its function's type, and the
    weight parameter's shape changed.
    """
    from tvm import relax

    fresh = {}
    funcs = {}
    for gv, func in mod.functions_items():
        name = str(gv.name_hint)
        if name in packings:
            fresh[name] = tvm.ir.GlobalVar(name)
            relax.expr._update_type(fresh[name], func.ty)  # what BlockBuilder.add_func does
            funcs[fresh[name]] = func
        else:
            funcs[gv] = func

    @relax.expr_functor.mutator
    class _Packer(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            call = super().visit_call_(call)
            if not (isinstance(call, relax.Call) and call.op.same_as(_call_tir_op())):
                return call
            callee = call.args[0]
            name = str(callee.name_hint) if isinstance(callee, tvm.ir.GlobalVar) else None
            if name not in packings:
                return call
            index, packing = packings[name]
            args = list(call.args[1].fields)
            args[index] = relax.const(packing.pack(args[index].value.numpy()))
            new_args = [fresh[name], relax.Tuple(args), *call.args[2:]]
            return relax.Call(call.op, new_args, call.attrs, call.ty_args, call.span)

    out = tvm.IRModule(funcs, attrs=mod.attrs)
    packer = _Packer(out)
    for gv, func in list(out.functions_items()):
        if isinstance(func, relax.Function):
            out[gv] = packer.visit_expr(func)
    return out
