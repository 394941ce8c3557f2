"""MetaSchedule tuning of a legalised, fused Relax module, with progress and record reuse.

``tune`` extracts one task per distinct PrimFunc, drops the tasks the database in ``db_dir``
already has records for (so a second compile of the same model tunes nothing), and tunes the rest
with ``max(trials, ...)`` measurements in all, calling ``progress(done, total, eta_s)`` after each
batch. ``apply_database`` swaps the tuned PrimFuncs into a module; ``schedule_module`` then leaves
them alone (they carry ``tirx.is_scheduled``).

A record never replaces a default schedule that measured faster: after tuning, ``tune`` builds
every task that has records twice, with our default schedule and with the best record, times both
on this machine (alternately, min of several repeats) and writes the verdict to
``db_dir/default_vs_tuned.json``; ``apply_database`` applies only the records that won (llvm
targets; on other targets every record is applied, as MetaSchedule does).

The cost model is XGBoost when ``xgboost`` is installed (``pip install gconv-compile[tune]``) and
MetaSchedule's random model otherwise (it still measures every candidate, it only picks them less
well).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import tirx
from tvm.target import Target

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, "float | None"], None]

_DB_FILES = ("database_workload.json", "database_tuning_record.json")
VERDICTS = "default_vs_tuned.json"  # task key -> default and tuned time, which one to keep


@dataclass
class TuneSummary:
    """What ``tune`` did."""

    tasks: list[str] = field(default_factory=list)  # every task of the module
    reused: list[str] = field(default_factory=list)  # tasks with records already in db_dir
    tuned: list[str] = field(default_factory=list)  # tasks tuned now
    trials: int = 0  # measurements made now
    seconds: float = 0.0
    cost_model: str = ""

    def line(self) -> str:
        return (
            f"tuning: {len(self.tasks)} task(s), {len(self.reused)} from the database, "
            f"{len(self.tuned)} tuned with {self.trials} trial(s) in {self.seconds:.0f} s"
        )


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401

        return "xgb"
    except ImportError:
        return "random"


def _database(db_dir: str | os.PathLike):
    from tvm.s_tir import meta_schedule as ms

    Path(db_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")


def _has_records(database, mod: tvm.IRModule) -> bool:
    """Tuned before: the database has measurements of ``mod`` (even failed ones, so a task whose
    every candidate failed is not tuned again on each compile)."""
    if not database.has_workload(mod):
        return False
    workload = database.commit_workload(mod)
    if database.get_top_k(workload, 1):
        return True
    return any(rec.workload.same_as(workload) for rec in database.get_all_tuning_records())


def tune(
    mod: tvm.IRModule,
    target: Target | dict | str,
    *,
    trials: int,
    db_dir: str | os.PathLike,
    progress: Progress | None = None,
    max_trials_per_task: int | None = None,
    build_timeout_s: float = 300.0,
    run_timeout_s: float = 60.0,
) -> TuneSummary:
    """Tune the PrimFuncs of a legalised, fused module that ``db_dir`` has no records for.

    Args:
        mod: The module after ``legalize_and_fuse`` (the same module the build schedules).
        target: The target to tune for (an llvm target on a CPU machine; a CUDA tag target such
            as ``nvidia/nvidia-h100`` where a GPU is present).
        trials: Measurements in all (MetaSchedule's ``max_trials_global``).
        db_dir: Database directory; created if missing, records appended.
        progress: Called as ``progress(done, total, eta_seconds_or_None)``.
        max_trials_per_task: Cap per task; default spreads ``trials`` evenly over the tasks.
        build_timeout_s: Per-candidate build limit (MetaSchedule's default 30 s is too short on
            a loaded 2-core machine).
        run_timeout_s: Per-candidate run limit.
    """
    from tvm.s_tir import meta_schedule as ms  # MetaSchedule loads only when tuning

    target = Target(target) if not isinstance(target, Target) else target
    summary = TuneSummary(cost_model=_cost_model())
    started = time.perf_counter()
    database = _database(db_dir)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    todo = []
    for task in extracted:
        summary.tasks.append(task.task_name)
        if _has_records(database, task.dispatched[0]):
            summary.reused.append(task.task_name)
        else:
            todo.append(task)
    if not todo or trials <= 0:
        if progress:
            progress(0, 0, 0.0)
        judge_records(extracted, database, target, db_dir)
        summary.seconds = time.perf_counter() - started
        logger.info("%s", summary.line())
        return summary
    per_task = max_trials_per_task or max(1, math.ceil(trials / len(todo)))
    total = min(trials, per_task * len(todo))
    measured = _tune_tasks(
        todo, database, summary.cost_model, db_dir=db_dir, total=total, per_task=per_task,
        progress=progress, build_timeout_s=build_timeout_s, run_timeout_s=run_timeout_s,
    )  # fmt: skip
    if progress and measured < total:
        progress(total, total, 0.0)  # MetaSchedule stops early when a space is exhausted
    summary.tuned = [t.task_name for t in todo]
    summary.trials = measured
    judge_records(extracted, database, target, db_dir)
    summary.seconds = time.perf_counter() - started
    logger.info("%s", summary.line())
    return summary


def _tune_tasks(
    todo: list,
    database,
    cost_model: str,
    *,
    db_dir: str | os.PathLike,
    total: int,
    per_task: int,
    progress: Progress | None,
    build_timeout_s: float,
    run_timeout_s: float,
) -> int:
    """Run MetaSchedule on the tasks ``todo``; returns how many candidates were measured."""
    from tvm.ir.utils import derived_object  # MetaSchedule loads only when tuning
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    measured = {"n": 0}
    # MetaSchedule's loggers print every round to stdout; its log files in db_dir/logs keep
    # them, and the caller's progress callback is what a person watches.
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir=str(db_dir), num_threads="physical"
        )
        tune_started = time.perf_counter()

        @derived_object
        class _Progress(PyMeasureCallback):
            def apply(
                self, task_scheduler, task_id, measure_candidates, builder_results, runner_results
            ):
                measured["n"] += len(runner_results)
                done = min(measured["n"], total)
                elapsed = time.perf_counter() - tune_started
                eta = elapsed / done * (total - done) if done else None
                if progress:
                    progress(done, total, eta)

        callbacks = [*ms.MeasureCallback.create("default"), _Progress()]
        # MetaSchedule's 30 s build timeout fails every candidate on a busy small machine.
        workers = max(1, (os.cpu_count() or 1) // 2)
        builder = ms.builder.LocalBuilder(max_workers=workers, timeout_sec=build_timeout_s)
        runner = ms.runner.LocalRunner(timeout_sec=run_timeout_s)
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(db_dir),
            max_trials_global=total,
            max_trials_per_task=per_task,
            num_trials_per_iter=max(4, min(64, per_task)),
            database=database,
            cost_model=cost_model,
            measure_callbacks=callbacks,
            builder=builder,
            runner=runner,
        )
    return measured["n"]


def apply_database(
    mod: tvm.IRModule, target: Target | dict | str, db_dir: str | os.PathLike
) -> tuple[tvm.IRModule, int]:
    """Swap in the best tuned schedule of every PrimFunc ``db_dir`` has records for, except
    where our default schedule measured faster (see ``judge_records``).

    Returns:
        The module and how many PrimFuncs came from the database (0 if ``db_dir`` has no records).
    """
    from tvm import relax, tirx

    if not all((Path(db_dir) / name).is_file() for name in _DB_FILES):
        return mod, 0

    def scheduled(m: tvm.IRModule) -> int:
        return sum(
            1
            for _, f in m.functions_items()
            if isinstance(f, tirx.PrimFunc)
            and f.attrs is not None
            and f.attrs.get("tirx.is_scheduled", False)
        )

    target = Target(target) if not isinstance(target, Target) else target
    keep = kept_defaults(mod, target, db_dir)
    originals = {gv: f for gv, f in mod.functions_items() if str(gv.name_hint) in keep}
    before = scheduled(mod)
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(db_dir))(mod)
    if originals:
        mod = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        for gv, func in originals.items():
            mod[gv] = func  # left for schedule_module's default schedule
    return mod, scheduled(mod) - before


# ------------------------------------------------------------------- default vs tuned


def task_key(func: tirx.PrimFunc) -> str:
    """The structural hash MetaSchedule's task of ``func`` has (its module, 'main' named)."""
    import tvm_ffi

    return str(tvm_ffi.structural_hash(tvm.IRModule({"main": func.with_attr("global_symbol", "main")})))  # fmt: skip


def read_verdicts(db_dir: str | os.PathLike) -> dict[str, dict]:
    """``db_dir``'s verdicts: task key -> {task, default_us, tuned_us, keep}."""
    path = Path(db_dir) / VERDICTS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("%s unreadable: every tuning record is applied", path)
        return {}


def kept_defaults(mod: tvm.IRModule, target: Target, db_dir: str | os.PathLike) -> dict[str, dict]:
    """PrimFunc name -> verdict, for the functions of ``mod`` whose default schedule won."""
    if target.kind.name != "llvm":
        return {}
    verdicts = read_verdicts(db_dir)
    keep = {k: v for k, v in verdicts.items() if v.get("keep") == "default"}
    if not keep:
        return {}
    out = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not _scheduled(func):
            verdict = keep.get(task_key(func))
            if verdict is not None:
                out[str(gv.name_hint)] = verdict
    return out


def _scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def judge_records(extracted: list, database, target: Target, db_dir: str | os.PathLike) -> dict:
    """Time the default schedule and the best record of every task with records not yet judged;
    write the verdicts to ``db_dir/default_vs_tuned.json`` (llvm only) and return them all."""
    if target.kind.name != "llvm":
        return {}
    verdicts = read_verdicts(db_dir)
    new = 0
    for task in extracted:
        task_mod = task.dispatched[0]
        key = task_key(task_mod["main"])
        if key in verdicts:
            continue
        with target:
            tuned = database.query_ir_module(task_mod, target, "main")
        if tuned is None:  # every candidate failed: nothing to apply
            continue
        try:
            verdict = time_default_and_tuned(task_mod, tuned, target)
        except Exception as err:  # noqa: BLE001 - a build TVM refuses: keep MetaSchedule's rule
            logger.warning("%s: default vs tuned not measured (%s)", task.task_name, err)
            continue
        verdicts[key] = {"task": task.task_name, **verdict}
        logger.info("%s: default %.1f us, tuned %.1f us: keep %s", task.task_name,
                    verdict["default_us"], verdict["tuned_us"], verdict["keep"])  # fmt: skip
        new += 1
    if new:
        from gconv_compile.files import write_text_atomic

        write_text_atomic(Path(db_dir) / VERDICTS, json.dumps(verdicts, indent=1) + "\n")
    return verdicts


def time_default_and_tuned(
    task_mod: tvm.IRModule, tuned: tvm.IRModule, target: Target, *, rounds: int = 3
) -> dict:
    """Build ``task_mod`` with our default schedule and ``tuned`` as it is; time both in turn.

    Returns:
        {"default_us", "tuned_us", "keep"}: the min of each side's repeats, and 'tuned' only when
        it was faster.
    """
    default = _default_module(task_mod, target)
    timers = {"default": _timer(default, target), "tuned": _timer(tuned, target)}
    best = {name: math.inf for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            best[name] = min(best[name], run())
    keep = "tuned" if best["tuned"] < best["default"] else "default"
    return {"default_us": round(best["default"], 2), "tuned_us": round(best["tuned"], 2),
            "keep": keep}  # fmt: skip


def _default_module(task_mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """The task's function with the schedule the build gives it (weights as constants)."""
    from .cpu import schedule_conv, schedule_fallback

    func = task_mod["main"]
    weights = frozenset(str(p.name) for p in func.params)
    with target:
        new, _, _, _ = schedule_conv(func, target, constant_params=weights)
        if new is None:
            new, _, _ = schedule_fallback(func, target, constant_params=weights)
    return tvm.IRModule({"main": new if new is not None else func})


def _timer(mod: tvm.IRModule, target: Target) -> Callable[[], float]:
    """Microseconds of one run of ``mod``'s main on seeded random arguments (min of 5)."""
    import numpy as np
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    lib = tvm.compile(mod, target=target).jit()
    device = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.standard_normal(info.shape).astype(info.dtype), device)
        for info in ArgInfo.from_prim_func(mod["main"])
    ]
    evaluator = lib.time_evaluator("main", device, number=1, repeat=5, min_repeat_ms=20)
    return lambda: float(evaluator(*args).min) * 1e6
