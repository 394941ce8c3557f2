"""The host CPU, from /proc/cpuinfo: which llvm -mcpu it is, whether it runs a build.

Standard library only: the compiler (``targets``) and the runtime-only loader (``runtime``,
which a deployment bundle carries without onnx or onnx-ir) both read it.
"""

from __future__ import annotations

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
