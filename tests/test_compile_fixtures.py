"""Every committed exporter fixture compiles for llvm and matches onnxruntime (issue #4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gconv_compile.compile import compile
from gconv_compile.tvm_verify import verify

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
