"""Target decisions that need no TVM: which llvm CPU this machine is, whether it can run a build.

The compiler (``gconv_compile.compile``) and the schedules (``gconv_compile.tvm_schedules``)
both ask this module, so neither imports the other.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from typing import Any

# llvm -mcpu names we choose from, most capable first, with the /proc/cpuinfo flags each needs.
X86_MCPU_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("skylake-avx512", frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})),
    ("haswell", frozenset({"avx2", "fma", "bmi2", "f16c"})),
    ("x86-64", frozenset()),
)


def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_llvm_target(mcpu: str | None = None) -> dict[str, str]:
    """The llvm target for this machine, without ``-mcpu=native`` (which TVM rejects).

    The CPU is named from /proc/cpuinfo flags: skylake-avx512, haswell or x86-64.
    """
    machine = platform.machine().lower()
    # MetaSchedule needs the core count in the target; the code itself runs on any count.
    cores = os.cpu_count() or 1
    if machine in ("x86_64", "amd64"):
        if mcpu is None:
            flags = cpu_flags()
            mcpu = next(name for name, needs in X86_MCPU_FLAGS if needs <= flags)
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": cores}
    if machine in ("aarch64", "arm64"):
        return {
            "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu or "generic",
            "num-cores": cores,
        }  # fmt: skip
    spec = {"kind": "llvm", "num-cores": cores}
    if mcpu:
        spec["mcpu"] = mcpu
    return spec


def host_can_run(spec: Mapping[str, Any]) -> str | None:
    """Why this machine cannot run code built for ``spec`` (None when it can)."""
    mcpu = spec.get("mcpu")
    triple = spec.get("mtriple", "")
    machine = platform.machine().lower()
    if triple.startswith("x86_64") and machine not in ("x86_64", "amd64"):
        return f"it was built for x86_64 and this machine is {machine}"
    if triple.startswith("x86_64") and mcpu:
        needs = dict(X86_MCPU_FLAGS).get(mcpu)
        if needs is not None and not needs <= cpu_flags():
            missing = ", ".join(sorted(needs - cpu_flags()))
            return f"it was built for -mcpu={mcpu} and this CPU lacks {missing}"
    return None
