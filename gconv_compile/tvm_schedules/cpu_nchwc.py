"""NCHW{v}c islands on llvm: 1x1 conv -> depthwise conv -> 1x1 conv with blocked activations.

In an inverted residual block (MobileNetV2) whose 1x1 convs take the channel form, the two
tensors inside the block change layout to ``(n, c / v, h, w, v)`` (``v`` = the vector width):

- the expand conv writes whole channel vectors instead of storing them lane by lane;
- the depthwise conv runs on channel vectors (``schedule_depthwise``): no strided gather for
  stride 2, its padded panel copied a vector at a time, weights repacked ``(C/v, 1, kh, kw, v)``;
- the project conv reads its input as a broadcast either way.

The block's input and output stay NCHW, so no layout transform is added anywhere. A function
also called outside islands (a function has one signature) gets a clone, ``<name>_nchw{v}c``,
for its island call sites; weights must be constants and shapes static, else the block keeps
NCHW. Measured alone (``benchmarks/nchwc_depthwise.py``, ``nchwc_bound.py``, 2
threads, AVX-512 EPYC): MobileNetV2's depthwise convs 448 -> 279 us, the channel-form convs'
stores 949 -> 847 us.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import tvm
from tvm import relax, s_tir, tirx

from ._conv import find_conv, single_epilogue
from .fold_batch_norm import VarUses

logger = logging.getLogger(__name__)


def _call_tir_op():
    return tvm.ir.Op.get("relax.call_tir")


def _blocked(v: int):
    return lambda n, c, h, w: (n, c // v, h, w, c % v)


def _tile(out_h: int, out_w: int, budget: int) -> tuple[int, int]:
    """(rows, cols) of output pixels per register tile: most accumulators within ``budget``."""
    best = (1, 1)
    for cols in [c for c in range(1, out_w + 1) if out_w % c == 0 and c <= budget]:
        for rows in [r for r in range(1, out_h + 1) if out_h % r == 0 and r * cols <= budget]:
            if rows * cols > best[0] * best[1]:
                best = (rows, cols)
    return best


def schedule_depthwise(func: tirx.PrimFunc, vector: int, registers: int = 32) -> tirx.PrimFunc:
    """The depthwise conv of the unscheduled fused ``func`` on NCHW{vector}c channel vectors.

    Its input, output and padded panel become ``(n, c / v, h, w, v)``, its weight
    ``(c / v, 1, kh, kw, v)`` (``cpu.Packing``); a tile of rows x cols pixels per task, taps
    unrolled, channel vectors innermost. Raises ValueError when ``func`` is not such a conv.
    """
    sch = s_tir.Schedule(func)
    conv = find_conv(sch)
    if isinstance(conv, str) or conv.kind != "depthwise" or conv.out_channels % vector:
        raise ValueError(f"not a depthwise conv with channels in {vector}s: {conv}")
    v, blocked = vector, _blocked(vector)
    epilogue = single_epilogue(sch, conv)
    sch.transform_layout(epilogue, ("write", 0), blocked)
    reads = [str(r.source.name) for r in sch.get(conv.block).reads]
    if conv.pad_block is not None:
        sch.transform_layout(conv.pad_block, ("read", 0), blocked)
        sch.transform_layout(conv.pad_block, ("write", 0), blocked)
        sch.transform_block_layout(conv.pad_block, blocked)
    else:
        data = next(i for i, name in enumerate(reads) if name != conv.weight_param)
        sch.transform_layout(conv.block, ("read", data), blocked)
    sch.transform_layout(
        conv.block,
        ("read", reads.index(conv.weight_param)),
        lambda o, i, h, w: (o // v, i, h, w, o % v),
    )
    sch.transform_layout(conv.block, ("write", 0), blocked)
    rows, cols = _tile(conv.out_h, conv.out_w, registers - 10)
    n, f, y, x, rc, ry, rx = sch.get_loops(conv.block)
    f_o, f_v = sch.split(f, [None, v])
    y_o, y_r = sch.split(y, [None, rows])
    x_o, x_r = sch.split(x, [None, cols])
    sch.reorder(n, f_o, y_o, x_o, rc, ry, rx, y_r, x_r, f_v)
    task = sch.fuse(n, f_o, y_o)
    sch.parallel(task)
    for loop in (rc, ry, rx, y_r, x_r):
        sch.unroll(loop)
    sch.vectorize(f_v)
    init = sch.decompose_reduction(conv.block, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.reverse_compute_at(epilogue, x_o, preserve_unit_loops=True)
    e_f, e_y, e_x = sch.get_loops(epilogue)[-3:]
    e_fo, e_fv = sch.split(e_f, [None, v])
    sch.reorder(e_fo, e_y, e_x, e_fv)
    for loop in (e_fo, e_y, e_x):
        sch.unroll(loop)
    sch.vectorize(e_fv)
    if conv.pad_block is not None:
        sch.compute_at(conv.pad_block, task, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(conv.pad_block)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def relayout_param(func: tirx.PrimFunc, param: int, vector: int) -> tirx.PrimFunc:
    """``func`` (scheduled) with its ``param``-th parameter blocked NCHW{vector}c: the layout
    change goes through the first block that writes (the output, the last parameter) or reads
    it, and applies to every access of that buffer."""
    name = str(func.params[param].name)
    sch = s_tir.Schedule(func)
    kind = "write" if param == len(func.params) - 1 else "read"
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        regions = getattr(sch.get(block), f"{kind}s")
        index = next((i for i, r in enumerate(regions) if str(r.source.name) == name), None)
        if index is not None:
            sch.transform_layout(block, (kind, index), _blocked(vector))
            return sch.mod["main"]
    raise ValueError(f"no block {kind}s parameter {name}")


def _can_expand(detail: str, channel: str) -> bool:
    """An island's expand conv: in the channel form already, or a dense 1x1 conv in the pixel
    form (28x28 and larger maps), which an island reschedules in the channel form: its stores
    are whole vectors there."""
    if channel in detail:
        return True
    return detail.startswith("dense conv") and " 1x1 s1 " in detail and "pixel form" in detail


@dataclass
class Island:
    """One block: the vars of the two tensors that change layout and the calls around them."""

    expand: str
    depthwise: str
    project: str
    project_input: int  # the project function's parameter fed by the depthwise output
    calls: tuple  # the three relax Calls (expand, depthwise, project)


def find_islands(
    main: relax.Function, decisions: dict[str, str], lanes: int
) -> tuple[list[Island], set[str]]:
    """The expand -> depthwise -> project chains of ``main`` that can run NCHW{lanes}c, and the
    names of their functions that are also called outside them."""
    values = dict(relax.analysis.get_var2val(main))
    counter = VarUses()
    counter.visit_expr(main)
    uses = counter.counts

    def call(var):
        value = values.get(var)
        if isinstance(value, relax.Call) and value.op.same_as(_call_tir_op()):
            return str(value.args[0].name_hint), list(value.args[1].fields)
        return None, []

    channel = f"channel form: {lanes}-wide"
    islands = []
    sites: dict[str, int] = {}
    for value in values.values():
        if not (isinstance(value, relax.Call) and value.op.same_as(_call_tir_op())):
            continue
        name = str(value.args[0].name_hint)
        sites[name] = sites.get(name, 0) + 1
        args = list(value.args[1].fields)
        for position, arg in enumerate(args):
            dw_name, dw_args = call(arg)
            if dw_name is None or "depthwise conv" not in decisions.get(dw_name, "") or not dw_args:
                continue
            exp_name, _ = call(dw_args[0])
            if channel not in decisions.get(name, "") or not _can_expand(
                decisions.get(exp_name or "", ""), channel
            ):
                continue
            if uses.get(arg, 0) != 1 or uses.get(dw_args[0], 0) != 1:
                continue
            calls = (values[dw_args[0]], values[arg], value)
            islands.append(Island(exp_name, dw_name, name, position, calls))
    # a function takes one role in every island it is in; one also called outside islands is
    # cloned for its island call sites
    roles: dict[str, set] = {}
    counts: dict[str, int] = {}
    for island in islands:
        for role in ("expand", "depthwise", "project"):
            roles.setdefault(getattr(island, role), set()).add(role)
            counts[getattr(island, role)] = counts.get(getattr(island, role), 0) + 1
    ok = {n for n, r in roles.items() if len(r) == 1}
    islands = [i for i in islands if {i.expand, i.depthwise, i.project} <= ok]
    partial = {n for n in ok if counts[n] < sites.get(n, 0)}
    return islands, partial


def apply_islands(mod: tvm.IRModule, original: tvm.IRModule, target, decisions: list,
                  constant_params) -> tuple[tvm.IRModule, dict, dict]:  # fmt: skip
    """Re-lay out the islands of ``mod`` (scheduled; ``original``: before our schedules).

    ``constant_params(name)``: the parameters every call of function ``name`` passes as
    constants. All or nothing: when any function of an island cannot be transformed, ``mod`` is
    returned unchanged. The decision lines of the functions involved say what changed.

    Returns:
        (module, {function name: (its new PrimFunc, its weight's cpu.Packing)} for the
        rescheduled functions, {clone name: original name}): the caller records the packings
        (``_pack_constants``), a clone keeping its original's where it has no new one.
    """
    from .cpu import vector_lanes

    lanes, registers = vector_lanes(target)
    details = {d.function: d for d in decisions}
    mains = [gv for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    if len(mains) != 1:
        return mod, {}, {}
    islands, partial = find_islands(mod[mains[0]], {k: d.detail for k, d in details.items()}, lanes)
    if not islands:
        return mod, {}, {}
    names = {n: f"{n}_nchw{lanes}c" if n in partial else n for i in islands
             for n in (i.expand, i.depthwise, i.project)}  # fmt: skip
    try:
        new, notes, dw_packings = _transform(
            mod, original, islands, lanes, registers, constant_params,
            {k: d.detail for k, d in details.items()}, target,
        )  # fmt: skip
        retyped = _retype(mod, {names[n]: f for n, f in new.items()}, islands, names, lanes)
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds; the blocks stay NCHW
        logger.debug("NCHWc islands not applied: %s", err)
        return mod, {}, {}
    for name in new:
        if name in partial:  # a clone for the island call sites: a decision of its own
            decision = dataclasses.replace(details[name], function=names[name])
            decisions.append(decision)
        else:
            decision = details[name]
        if name in dw_packings:  # a new schedule: its own line
            decision.detail = notes[name]
        else:
            decision.detail += notes[name]
    packed = {names[n]: (new[n], packing) for n, packing in dw_packings.items()}
    clones = {names[n]: n for n in new if n in partial}
    return retyped, packed, clones


def _channel_form(func, target, constants, lanes):
    """``func`` scheduled in the channel form: (function, its decision detail, its packing)."""
    from .cpu import schedule_conv

    scheduled, _, detail, packing = schedule_conv(func, target, constant_params=constants,
                                                  form="channel")  # fmt: skip
    if scheduled is None or f"channel form: {lanes}-wide" not in detail or packing is None:
        raise ValueError(f"no {lanes}-wide channel form: {detail}")
    return scheduled, detail, packing


def _transform(mod, original, islands, lanes, registers, constant_params, details, target):
    from .cpu import Packing

    new, notes, dw_packings = {}, {}, {}
    for island in islands:
        if island.depthwise not in new:
            func = original[island.depthwise]
            conv = find_conv(s_tir.Schedule(func))
            weights = constant_params(island.depthwise)
            if isinstance(conv, str) or conv.weight_param not in weights:
                raise ValueError(f"{island.depthwise}: weights are not constants")
            if str(func.params[0].name) == conv.weight_param:
                raise ValueError(f"{island.depthwise}: the data is not the first parameter")
            new[island.depthwise] = schedule_depthwise(func, lanes, registers)
            dw_packings[island.depthwise] = Packing(conv.weight_param, lanes)
            rows, cols = _tile(conv.out_h, conv.out_w, registers - 10)
            notes[island.depthwise] = (
                f"{conv.describe()}: NCHW{lanes}c channel-vector form (input and output): "
                f"{lanes}-wide vectors along channels, {rows * cols} accumulators "
                f"({rows} row x {cols} col)"
            )
        if island.expand not in new:
            func, note = mod[island.expand], ""
            if f"channel form: {lanes}-wide" not in details[island.expand]:
                func, note, packing = _channel_form(original[island.expand], target,
                                                    constant_params(island.expand), lanes)  # fmt: skip
                dw_packings[island.expand] = packing
            new[island.expand] = relayout_param(func, len(func.params) - 1, lanes)
            notes[island.expand] = f"{note}; output NCHW{lanes}c (whole-vector stores)"
        if island.project not in new:
            new[island.project] = relayout_param(mod[island.project], island.project_input, lanes)
            notes[island.project] = f"; input NCHW{lanes}c"
    return new, notes, dw_packings


def _retype(mod: tvm.IRModule, new: dict, islands: list, names: dict, lanes: int) -> tvm.IRModule:  # fmt: skip
    """``mod`` with the new functions (by final name: a clone's is new) under fresh GlobalVars,
    the islands' calls redirected to them and the island tensors' calls returning their
    blocked shapes."""
    fresh, funcs = {}, {}
    for gv, func in mod.functions_items():
        if str(gv.name_hint) not in new:
            funcs[gv] = func
    for name, func in new.items():
        fresh[name] = tvm.ir.GlobalVar(name)
        relax.expr._update_type(fresh[name], func.ty)
        funcs[fresh[name]] = func
    sites = []  # (original Call, new function name, returns a blocked tensor)
    for island in islands:
        for role, call in zip(("expand", "depthwise", "project"), island.calls, strict=True):
            sites.append((call, names[getattr(island, role)], role != "project"))

    @relax.expr_functor.mutator
    class _Retyper(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 - TVM's visitor naming
            site = next((x for x in sites if x[0].same_as(call)), None)
            name, is_blocked = (site[1], site[2]) if site else (None, False)
            call = super().visit_call_(call)
            if name is None:
                return call
            ty_args = call.ty_args
            if is_blocked:
                (out,) = ty_args
                n, c, h, w = (int(d) for d in out.shape.values)
                ty_args = [relax.TensorType([n, c // lanes, h, w, lanes], out.dtype)]
            args = [fresh[name], *call.args[1:]]
            return relax.Call(call.op, args, call.attrs, ty_args, call.span)

    out = tvm.IRModule(funcs, attrs=mod.attrs)
    retyper = _Retyper(out)
    for gv, func in list(out.functions_items()):
        if isinstance(func, relax.Function):
            out[gv] = retyper.visit_expr(func)
    return out
