"""What a command did, for people (text) and for machines (JSON)."""

from __future__ import annotations

import dataclasses
from typing import Any

from gconv_compile.compare import CheckResult, OutputStats
from gconv_compile.passes import Rewrite, Skip

# The verb a rewrite's line starts with, from its pass name's first word.
_VERBS = {"fold": "folded", "expand": "expanded", "lower": "lowered", "resolve": "resolved"}


@dataclasses.dataclass
class Report:
    """Rewrites, refusals, node counts and the numeric check of one run."""

    command: str
    input: str | None = None
    output: str | None = None
    target: str | None = None
    rewrites: list[Rewrite] = dataclasses.field(default_factory=list)
    skips: list[Skip] = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    check: CheckResult | None = None
    check_note: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "input": self.input,
            "output": self.output,
            "target": self.target,
            "summary": {
                "rewrites": len(self.rewrites),
                "skipped": len(self.skips),
                "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after,
                "check_passed": None if self.check is None else self.check.passed,
            },
            "rewrites": [r.to_dict() for r in self.rewrites],
            "skipped": [s.to_dict() for s in self.skips],
            "check": None if self.check is None else self.check.to_dict(),
            "check_note": self.check_note,
            "warnings": self.warnings,
            **self.extra,
        }

    def lines(self) -> list[str]:
        """One line per rewrite and refusal, then the check and a summary."""
        out = []
        for rewrite in self.rewrites:
            verb = _VERBS.get(rewrite.pass_name.split("-", 1)[0], "rewrote")
            out.append(f"{verb:8} {rewrite.scope}/{rewrite.anchor}: {rewrite.summary}")
        for skip in self.skips:
            out.append(f"{'skipped':8} {skip.scope}/{skip.anchor}: {skip.reason}")
        for warning in self.warnings:
            out.append(f"{'warning':8} {warning}")
        if self.check is not None:
            out.append(f"{'check':8} {self.check.summary()}")
            for stat in self.check.outputs:
                out.append(f"{'':8}   {stat_line(stat)}")
            # Every rewritten value that fails, and the closest one to failing.
            values = sorted(self.check.values, key=lambda s: s.margin, reverse=True)
            for stat in [s for s in values if not s.passed] or values[:1]:
                out.append(f"{'':8}   rewritten value {stat_line(stat)}")
        elif self.check_note:
            out.append(f"{'check':8} {self.check_note}")
        kinds = {r.pass_name for r in self.rewrites}
        if kinds == {"fold-split-conv-concat"} or (not kinds and self.command == "optimize"):
            noun = "blocks folded"
        elif kinds == {"expand-grouped-conv"} or (not kinds and self.command == "expand"):
            noun = "convs expanded"
        else:
            noun = "rewrites"
        out.append(
            f"summary: {len(self.rewrites)} {noun}, {len(self.skips)} skipped; "
            f"nodes {self.nodes_before} -> {self.nodes_after}"
            + (f"; wrote {self.output}" if self.output else "")
        )
        return out


def stat_line(stat: OutputStats) -> str:
    """One output's numbers: errors, the allowance, the margin (error / allowed) and a flag."""
    flag = "ok" if stat.passed else "FAIL"
    return (
        f"{stat.name}: max abs {stat.max_abs_error:.3g}, max rel {stat.max_rel_error:.3g} "
        f"(atol {stat.atol:g}, rtol {stat.rtol:g}), margin {stat.margin:.3g} {flag}"
        + (f" - {stat.note}" if stat.note else "")
    )
