"""Two builds of one model against each other in one process, runs alternating: A/B of a change.

Run: ``python benchmarks/model_ab.py INPUT.npy A.so B.so [--rounds 8] [--top 30]``

Build A and B from two commits (``gconv-compile compile model.onnx -o A.so --no-check`` in
each checkout, or ``benchmarks/resnext.py``'s cache) and compare them here: both libraries are
loaded by the product's loader into one process (one TVM thread pool, so neither steals the
other's cores), and each round runs A 5 times, B 5 times, then one instrumented run of each
(``model_profile.py``'s per-call timing). On a machine whose speed moves between minutes,
the alternation keeps the two sides under the same conditions; the outputs are compared too.
Printed: whole-run min and median of each side and their ratio, then per function A's and B's
time in the run (min over rounds) and B/A, by A's time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    from kernel_timing import machine_line
    from model_profile import _profile

    import gconv_compile

    x = np.load(args.input)
    sides = []
    for path in (args.a, args.b):
        library = gconv_compile.load(path)
        prepared = library.prepare({library.input_names[0]: x})
        sides.append({"lib": library, "args": prepared, "whole": [], "calls": {}})
    outs = [np.from_dlpack(s["lib"].call(s["args"])[0]).copy() for s in sides]
    for _ in range(args.rounds):
        for side in sides:
            for _ in range(5):
                start = time.perf_counter()
                side["lib"].call(side["args"])
                side["whole"].append(time.perf_counter() - start)
            once = _profile(side["lib"], [*side["args"], *side["lib"]._weights], 1)
            for name, (us, count) in once.items():
                side["calls"][name] = min(side["calls"].get(name, (us, count)), (us, count))
    a, b = sides
    print(machine_line())
    print(f"max |A - B| of the outputs: {float(np.abs(outs[0] - outs[1]).max()):.3g}")
    ma, mb = min(a["whole"]) * 1e3, min(b["whole"]) * 1e3
    da, db = np.median(a["whole"]) * 1e3, np.median(b["whole"]) * 1e3
    print(f"whole run: min A {ma:.3f} B {mb:.3f} ms (B/A {mb / ma:.3f}); "
          f"median A {da:.3f} B {db:.3f} ms (B/A {db / da:.3f})")  # fmt: skip
    print(f"{'A us':>9} {'B us':>9} {'B/A':>5} calls  function")
    for name, (us, count) in sorted(a["calls"].items(), key=lambda kv: -kv[1][0])[: args.top]:
        other = b["calls"].get(name, (float("nan"), 0))[0]
        print(f"{us:9.1f} {other:9.1f} {other / us:5.2f} {count:5d}  {name}")
    missing = sorted(set(b["calls"]) - set(a["calls"]))
    if missing:
        print(f"only in B: {', '.join(missing[:10])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
