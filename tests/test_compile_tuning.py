"""`gconv-compile compile` with the schedules and MetaSchedule tuning wired in."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from builders import split_conv_concat


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gconv_compile", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tuning") / "model.onnx"
    onnx.save(split_conv_concat(split_form="split13", channels=8, groups=2, spatial=(8, 8)), path)
    return path


def test_report_names_the_schedule_of_each_conv(model_path, tmp_path):
    report = tmp_path / "r.json"
    done = _cli("compile", str(model_path), "-o", str(tmp_path / "m.so"), "--report", str(report))
    assert done.returncode == 0, done.stderr
    schedules = json.loads(report.read_text())["schedules"]
    convs = [d for d in schedules if "conv" in d["function"]]
    assert convs and all(d["schedule"] == "cpu-grouped-conv" for d in convs), schedules
    assert "schedule " in done.stdout and "cpu-grouped-conv" in done.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tune-trials", "4"], "needs --tune-db"),
        (["--tune-trials", "-1", "--tune-db", "DB"], "0 or more"),
        (["--tune-trials", "4", "--tune-db", "DB"], "tuning needs static input shapes"),
    ],
    ids=["trials-without-db", "negative-trials", "symbolic-batch"],
)
def test_bad_tuning_options_exit_2(model_path, tmp_path, extra, message):
    extra = [str(tmp_path / "db") if e == "DB" else e for e in extra]
    out = tmp_path / "m.so"
    done = _cli("compile", str(model_path), "-o", str(out), *extra)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_tune_then_reuse_records(model_path, tmp_path):
    """A second compile with the same --tune-db measures nothing and applies the records."""
    db = tmp_path / "db"
    args = ["--tune-trials", "2", "--tune-db", str(db), "--shape", "X=1x8x8x8"]
    first = _cli("compile", str(model_path), "-o", str(tmp_path / "a.so"), *args)
    assert first.returncode == 0, first.stderr
    assert "1 tuned with" in first.stdout and "tuning [" in first.stderr
    second = _cli("compile", str(model_path), "-o", str(tmp_path / "b.so"), *args)
    assert second.returncode == 0, second.stderr
    assert "1 from the database, 0 tuned" in second.stdout
    # the record is applied where it measured faster than the default schedule, else not
    (verdict,) = json.loads((db / "default_vs_tuned.json").read_text()).values()
    if verdict["keep"] == "tuned":
        assert "tuned (schedule from the tuning database)" in second.stdout
    else:
        assert "kept over the tuning record" in second.stdout
    verify = _cli(
        "verify", str(model_path), "--lib", str(tmp_path / "b.so"), "--shape", "X=1x8x8x8"
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
