"""Expand and fold the zoo models from the onnx wheel through the CLI; print a table.

Run: ``python scripts/zoo_roundtrip.py``. ShuffleNet v1 and AlexNet from
``onnx/backend/test/data/light/`` get seeded random weights (their ConstantOfShape(0.02)
placeholders would hide channel-order mistakes; see tests/grouped_models.py), then go through
``gconv-compile expand`` (split and dense), ``optimize`` of the expanded model (the round trip)
and ``optimize --target generic-npu``, each checked by onnxruntime. The table quotes the
reports: rewrites, node counts and the worst absolute error of the check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from grouped_models import zoo_model  # noqa: E402

STEPS = [
    ("expand (split)", "expand", "model.onnx", "split.onnx", []),
    ("optimize(expanded): round trip", "optimize", "split.onnx", "folded.onnx", []),
    (
        "optimize --target generic-npu",
        "optimize",
        "model.onnx",
        "npu.onnx",
        ["--target", "generic-npu"],
    ),
    ("expand --mode dense", "expand", "model.onnx", "dense.onnx", ["--mode", "dense"]),
]


def main() -> None:
    print("| model | command | rewrites | nodes | max abs error |")
    print("|---|---|---:|---|---:|")
    for name, label in (("light_shufflenet", "ShuffleNet v1"), ("light_bvlc_alexnet", "AlexNet")):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            onnx.save(zoo_model(name), work / "model.onnx")
            for title, command, src, dst, extra in STEPS:
                report = work / f"{dst}.json"
                done = subprocess.run(
                    [sys.executable, "-m", "gconv_compile", command, str(work / src),
                     "-o", str(work / dst), "--report", str(report), *extra],
                    capture_output=True, text=True,
                )  # fmt: skip
                if done.returncode != 0:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    raise SystemExit(f"{label}: {title} exited {done.returncode}")
                data = json.loads(report.read_text())
                summary = data["summary"]
                check = data["check"] or {}
                worst = max((o["max_abs_error"] for o in check.get("outputs", [])), default=0.0)
                print(
                    f"| {label} | {title} | {summary['rewrites']} | "
                    f"{summary['nodes_before']} -> {summary['nodes_after']} | {worst:.3g} |"
                )


if __name__ == "__main__":
    main()
