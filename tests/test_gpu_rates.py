"""scripts/gpu_rates.py: a GPU kit run's tensor-core / CUDA-core pairs become the rates
``cuda_plan`` estimates with; a rehearsal or a run without pairs is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gconv_compile import cuda_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gpu_rates  # noqa: E402

CONV = {"stride": 1, "pad": 1, "group": 32, "in_shape": [1, 512, 14, 14],
        "weight_shape": [512, 16, 3, 3], "out_shape": [1, 512, 14, 14]}  # fmt: skip


def _files(tmp_path, mode="gpu", fast_ms=0.004, slow_ms=0.02, passed=True):
    manifest = {"models": [{"name": "s3_gconv_s1", "conv": CONV},
                           {"name": "s3_gconv_s1-cuda-cores", "conv": CONV}]}  # fmt: skip
    rows = [{"name": "s3_gconv_s1", "dtype": "float16", "passed": passed, "tvm_ms": fast_ms},
            {"name": "s3_gconv_s1-cuda-cores", "dtype": "float16", "passed": True,
             "tvm_ms": slow_ms}]  # fmt: skip
    results = {"mode": mode, "device": "NVIDIA H200", "date": "2026-12-01 10:00 UTC",
               "models": rows}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    (tmp_path / "r.json").write_text(json.dumps(results))
    return ["--manifest", str(tmp_path / "m.json"), "-o", str(tmp_path / "rates.json")]


def test_pairs_become_rates_the_plan_reads(tmp_path):
    args = _files(tmp_path)
    assert gpu_rates.main([str(tmp_path / "r.json"), *args]) == 0
    tensor, cuda_core, source = cuda_plan.rates(tmp_path / "rates.json")
    useful = 2 * 512 * 16 * 9 * 196  # the conv's own FLOPs; no padding at 16 per group
    assert tensor == pytest.approx(useful / 0.004e-3)
    assert cuda_core == pytest.approx(useful / 0.02e-3)
    assert source == "rates measured on NVIDIA H200 2026-12-01 10:00 UTC"


@pytest.mark.parametrize(("edit", "why"), [({"mode": "rehearse"}, "not a GPU run"),
                                           ({"passed": False}, "no passed, timed")])  # fmt: skip
def test_rehearsals_and_failed_pairs_are_refused(tmp_path, capsys, edit, why):
    args = _files(tmp_path, **edit)
    assert gpu_rates.main([str(tmp_path / "r.json"), *args]) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "rates.json").exists()


def test_without_measurements_the_datasheet_decides():
    assert cuda_plan.rates(Path("/nonexistent/cuda_rates.json"))[2] == "datasheet rates"
    if not cuda_plan.MEASURED_RATES.exists():
        assert "(datasheet rates)" in cuda_plan.plan(32, 16, 16, 9, 196).describe()
