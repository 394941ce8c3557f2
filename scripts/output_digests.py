"""Print a sha256 of what ``optimize`` and ``expand`` write for every fixture model.

Run: ``python scripts/output_digests.py > digests.json`` before and after a refactor and diff the
two files: equal digests mean byte-identical outputs. Models: the committed exporter fixtures
(``tests/fixtures/**.onnx``), the examples' models and the zoo models the tests use (ShuffleNet
v1, AlexNet with seeded weights). Each goes through the Python API with the check off (the check
does not change what is written): ``optimize`` (default target), ``optimize`` for
``generic-npu``, and ``expand`` in split and dense mode.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import gconv_compile  # noqa: E402
from gconv_compile.errors import GconvError  # noqa: E402


def _models() -> dict[str, onnx.ModelProto]:
    from grouped_models import zoo_model

    models = {
        str(path.relative_to(ROOT)): onnx.load(path)
        for path in sorted((ROOT / "tests" / "fixtures").rglob("*.onnx"))
    }
    for name in ("light_shufflenet", "light_bvlc_alexnet"):
        models[f"zoo:{name}"] = zoo_model(name)
    for example in sorted((ROOT / "examples").glob("*/model.py")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model.onnx"
            namespace: dict = {"__name__": "digest"}
            exec(compile(example.read_text(), str(example), "exec"), namespace)
            build = namespace.get("build_model") or namespace.get("make_model")
            if build is None:
                continue
            model = build()
            if isinstance(model, onnx.ModelProto):
                models[str(example.relative_to(ROOT))] = model
            else:
                onnx.save(model, out)
                models[str(example.relative_to(ROOT))] = onnx.load(out)
    return models


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def main() -> None:
    runs = {
        "optimize": lambda m: gconv_compile.optimize(m, check=False)[0],
        "optimize-generic-npu": lambda m: gconv_compile.optimize(
            m, target="generic-npu", check=False
        )[0],
        "expand-split": lambda m: gconv_compile.expand(m, mode="split", check=False)[0],
        "expand-dense": lambda m: gconv_compile.expand(m, mode="dense", check=False)[0],
    }
    result = {}
    for name, model in _models().items():
        for run, fn in runs.items():
            try:
                copy = onnx.ModelProto()
                copy.CopyFrom(model)  # each run gets the model as loaded, not a previous run's
                result[f"{name} {run}"] = _digest(fn(copy))
            except GconvError as exc:
                result[f"{name} {run}"] = f"error: {type(exc).__name__}"
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
