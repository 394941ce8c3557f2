"""Every committed exporter fixture compiles for llvm and matches onnxruntime (issue #4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gconv_compile.build import compile
from gconv_compile.verify import verify

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "torch").glob("*.onnx"))


def test_fixtures_are_present():
    assert len(FIXTURES) >= 12


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_compiles_for_llvm_and_verifies(path, tmp_path):
    library = tmp_path / f"{path.stem}.so"
    built = compile(path, "llvm", output=library, seeds=(0,))
    assert library.stat().st_size > 0
    assert built.info.optimized
    result = verify(path, library=library, seeds=(0, 1))
    assert result.passed, [s.to_dict() for s in result.outputs]
    # The reference is onnxruntime on the original file, the candidate the library.
    assert "onnxruntime" in result.reference and str(library) in result.candidate


def test_runner_reads_aligned_inputs_in_place_and_copies_others(tmp_path):
    """Aligned inputs go in by DLPack, unaligned ones are copied: both give the same outputs."""
    import numpy as np

    path = FIXTURES[0]
    runner = compile(path, "llvm", check=False).runner()
    spec = runner.info.inputs[0]
    shape = [2 if not isinstance(d, int) else d for d in spec.shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    raw = np.empty(x.nbytes + 128, np.uint8)
    base = -raw.ctypes.data % 64
    aligned = raw[base : base + x.nbytes].view(np.float32).reshape(shape)
    unaligned = raw[base + 4 : base + 4 + x.nbytes].view(np.float32).reshape(shape)
    aligned[...] = x
    first = runner.run({spec.name: aligned})
    unaligned[...] = x
    second = runner.run({spec.name: unaligned})
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
