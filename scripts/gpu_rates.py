"""Turn a GPU kit run into the rates ``gconv_compile.cuda_plan`` estimates with.

    python scripts/gpu_rates.py GPU_RESULTS_JSON [--manifest dist/gpu-kit/manifest.json]
        [-o gconv_compile/cuda_rates.json]

The kit builds each float16 ResNeXt-50 conv twice: on tensor cores (``NAME``) and on CUDA cores
(``NAME-cuda-cores``). For every pair both ran correctly, the achieved rates are the work each
kernel did over its measured time: the tensor-core kernel's padded multiply-adds (the plan's
``waste`` times the conv's own) and the CUDA-core kernel's own. The file gets the medians, the
device and the date; ``cuda_plan.rates`` reads it (only the ratio decides). Exits 2 when the
results are a rehearsal's or hold no such pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gconv_compile.cuda_plan import MEASURED_RATES, plan  # noqa: E402

SUFFIX = "-cuda-cores"


def pair_rates(results: dict, manifest: dict) -> list[tuple[str, float, float]]:
    """(conv, tensor-core FLOP/s, CUDA-core FLOP/s) for every pair that passed and was timed."""
    convs = {row["name"]: row["conv"] for row in manifest["models"] if row.get("conv")}
    timed = {(r["name"], r["dtype"]): r for r in results["models"]
             if r.get("passed") and r.get("tvm_ms")}  # fmt: skip
    found = []
    for (name, dtype), slow in sorted(timed.items()):
        fast = timed.get((name.removesuffix(SUFFIX), dtype))
        if not name.endswith(SUFFIX) or fast is None or dtype != "float16":
            continue
        conv = convs[fast["name"]]
        out, weight = conv["out_shape"], conv["weight_shape"]
        group = conv["group"]
        pixels = out[0] * out[2] * out[3]
        taps = weight[2] * weight[3]
        chosen = plan(group, weight[0] // group, weight[1], taps, pixels)
        useful = 2.0 * chosen.macs
        found.append((fast["name"], useful * chosen.waste / (fast["tvm_ms"] * 1e-3),
                      useful / (slow["tvm_ms"] * 1e-3)))  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--manifest", type=Path, default=ROOT / "dist/gpu-kit/manifest.json")
    parser.add_argument("-o", "--output", type=Path, default=MEASURED_RATES)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if results.get("mode") != "gpu":
        print(f"gpu_rates: {args.results} is a {results.get('mode')} run, not a GPU run",
              file=sys.stderr)  # fmt: skip
        return 2
    pairs = pair_rates(results, json.loads(args.manifest.read_text()))
    if not pairs:
        print(f"gpu_rates: no passed, timed tensor-core/CUDA-core pair in {args.results}",
              file=sys.stderr)  # fmt: skip
        return 2
    for name, tensor, cuda_core in pairs:
        print(f"{name:<16} tensor cores {tensor / 1e12:8.2f} TFLOP/s  "
              f"CUDA cores {cuda_core / 1e12:8.2f} TFLOP/s")  # fmt: skip
    data = {"device": results["device"], "date": results["date"],
            "tensor_flops": statistics.median(t for _, t, _ in pairs),
            "cuda_core_flops": statistics.median(c for _, _, c in pairs),
            "pairs": [list(p) for p in pairs],
            "command": "python scripts/gpu_rates.py " + " ".join(argv or sys.argv[1:])}  # fmt: skip
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    print(f"gpu_rates: wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
