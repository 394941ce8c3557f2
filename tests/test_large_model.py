"""Models with external data, small (in ``make test``) and over 2 GB (``make test-slow``).

The model is written straight to disk (weights streamed in chunks, the proto built by hand) so
that the test process never holds the weights::

    X(2I) ─ Split ─ Conv(W0[O,I]) ─┐
                  └ Conv(W1[O,I]) ─ Concat ─ Y        (folded: one Conv(group=2))
    X(2I) ─ Conv(W2[O2,2I]) ─ Z                        (untouched)

``optimize`` (then ``expand`` on its output) runs through the CLI in a subprocess; the tests
check that the weights land in ``OUT.data`` beside OUT, that W2 (untouched) and, after
fold-then-expand, W0 and W1 come back bit-identical, and, for the big model, the subprocess's
peak resident memory against the weight bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import IR_VERSION
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
ALIGN = 4096
CHUNK_FLOATS = 1 << 24  # 64 MiB of float32 per write
MEMORY_FACTOR = 1.5


@dataclass(frozen=True)
class Sizes:
    block_in: int  # I: input channels of each branch
    block_out: int  # O: output channels of each branch
    untouched_out: int  # O2: output channels of the untouched Conv

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        i, o = self.block_in, self.block_out
        return {
            "W0": (o, i, 1, 1),
            "W1": (o, i, 1, 1),
            "B0": (o,),
            "B1": (o,),
            "W2": (self.untouched_out, 2 * i, 1, 1),
        }

    @property
    def weight_bytes(self) -> int:
        return sum(4 * int(np.prod(s)) for s in self.shapes.values())


SMALL = Sizes(block_in=512, block_out=512, untouched_out=768)  # ~5 MiB
# 1 GiB in the foldable block, 1.2 GB untouched: 2.25 GB in all, past protobuf's 2 GiB.
LARGE = Sizes(block_in=16384, block_out=8192, untouched_out=9000)


def write_model(
    folder: Path, sizes: Sizes, *, seed: int = 0, ir_version: int = IR_VERSION
) -> tuple[Path, dict[str, str]]:
    """Write model.onnx + model.onnx.data; return the path and each weight's sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    rng = np.random.default_rng(seed)
    tensors, digests = [], {}
    with open(folder / data_name, "wb") as data:
        for name, shape in sizes.shapes.items():
            offset = data.tell()
            pad = -offset % ALIGN
            data.write(b"\0" * pad)
            offset += pad
            digest = hashlib.sha256()
            remaining = int(np.prod(shape))
            while remaining:
                count = min(remaining, CHUNK_FLOATS)
                chunk = rng.standard_normal(count, dtype=np.float32)
                chunk *= np.float32(1.0 / np.sqrt(max(shape[1:2] or (1,))))  # keep sums O(1)
                blob = chunk.tobytes()
                data.write(blob)
                digest.update(blob)
                remaining -= count
            length = data.tell() - offset
            tensor = TensorProto(name=name, dims=list(shape), data_type=TensorProto.FLOAT)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensors.append(tensor)
            digests[name] = digest.hexdigest()
    i, o = sizes.block_in, sizes.block_out
    sizes_init = onnx.numpy_helper.from_array(np.array([i, i], np.int64), "sizes")
    nodes = [
        helper.make_node("Split", ["X", "sizes"], ["x0", "x1"], axis=1, name="split"),
        helper.make_node("Conv", ["x0", "W0", "B0"], ["c0"], name="conv0"),
        helper.make_node("Conv", ["x1", "W1", "B1"], ["c1"], name="conv1"),
        helper.make_node("Concat", ["c0", "c1"], ["Y"], axis=1, name="concat"),
        helper.make_node("Conv", ["X", "W2"], ["Z"], name="untouched"),
    ]
    graph = helper.make_graph(
        nodes, "big",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2 * i, 2, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 2 * o, 2, 2]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", sizes.untouched_out, 2, 2])],
        [sizes_init, *tensors],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir_version
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path, digests


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int
    seconds: float
    phases: dict[str, dict[str, int]]

    def phase_lines(self) -> list[str]:
        return [
            f"  {name:24s} peak RSS {p['rss'] / 1e9:5.2f} GB (anon {p['anon'] / 1e9:5.2f}, "
            f"file-backed {p['file'] / 1e9:5.2f})"
            for name, p in self.phases.items()
        ]


def run_cli(*args: str | Path) -> CliRun:
    """The CLI in a subprocess (under tests/memory_phases.py, which tags its phases); its peak
    RSS is the child's VmHWM (wait4's ru_maxrss, in KiB, if the child did not report it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.monotonic()
    with subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("memory_phases.py")), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        # Read the pipes in full before reaping, so a chatty child cannot block on a full pipe.
        stdout, stderr = process.stdout.read(), process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    phases: dict = {}
    kept = []
    # wait4's ru_maxrss also counts the parent's pages a vfork()ed child is charged before it
    # execs (a pytest process that ran TVM builds is GBs), so the child's own VmHWM wins.
    peak = usage.ru_maxrss * 1024
    for line in stderr.splitlines():
        if line.startswith("MEMORY-PHASES "):
            phases = json.loads(line.split(" ", 1)[1])
        elif line.startswith("MEMORY-HWM "):
            peak = int(line.split(" ", 1)[1])
        else:
            kept.append(line)
    return CliRun(
        process.returncode, stdout, "\n".join(kept), peak, time.monotonic() - start, phases
    )


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of each initializer's bytes, read from wherever the model stores them."""
    proto = onnx.load(str(path), load_external_data=False)
    digests = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            location = path.parent / info["location"]
            assert location.parent == path.parent, f"{tensor.name} data not beside {path.name}"
            with open(location, "rb") as data:
                data.seek(int(info.get("offset", 0)))
                blob = data.read(int(info["length"]))
        else:
            blob = onnx.numpy_helper.to_array(tensor).tobytes()
        digests[tensor.name] = hashlib.sha256(blob).hexdigest()
    return digests


def external_locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        e.value
        for t in proto.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }


def _expand_available() -> bool:
    from gconv_compile import cli

    return "expand" in getattr(cli, "_COMMANDS", {})


def _fold_then_expand(tmp_path: Path, sizes: Sizes) -> dict:
    """optimize IN -> out/folded.onnx, expand it -> out2/expanded.onnx; check the files."""
    model, digests = write_model(tmp_path / "in", sizes)
    input_state = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "in").iterdir()}
    folded = tmp_path / "out" / "folded.onnx"
    folded.parent.mkdir()

    optimize = run_cli("optimize", model, "-o", folded)
    assert optimize.returncode == 0, optimize.stderr
    assert "1 blocks folded" in optimize.stdout
    assert sorted(p.name for p in folded.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    assert external_locations(folded) == {"folded.onnx.data"}
    after = tensor_digests(folded)
    assert after["W2"] == digests["W2"], "the untouched weight changed"
    assert not {"W0", "W1"} & set(after), "the folded weights are still there"
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "in").iterdir()} == input_state
    measured = {"optimize": optimize}

    if _expand_available():
        expanded = tmp_path / "out2" / "expanded.onnx"
        expanded.parent.mkdir()
        expand = run_cli("expand", folded, "-o", expanded, "--mode", "split")
        assert expand.returncode == 0, expand.stderr
        assert external_locations(expanded) == {"expanded.onnx.data"}
        back = tensor_digests(expanded)
        assert back["W2"] == digests["W2"]
        # Fold then split-expand is the identity on the weights: W0, W1, B0, B1 come back.
        for name in ("W0", "W1", "B0", "B1"):
            matches = [k for k, v in back.items() if v == digests[name]]
            assert matches, f"{name} did not come back bit-identical after fold + expand"
        measured["expand"] = expand
    return measured


def test_small_external_data_lands_beside_out_and_untouched_weights_are_identical(
    tmp_path: Path,
) -> None:
    measured = _fold_then_expand(tmp_path, SMALL)
    assert measured["optimize"].returncode == 0


def test_external_data_beside_out_when_out_is_elsewhere(tmp_path: Path) -> None:
    """OUT in another folder: OUT.data goes there, and the input folder gains nothing."""
    model, digests = write_model(tmp_path / "in", SMALL)
    out = tmp_path / "elsewhere" / "deeper" / "result.onnx"
    out.parent.mkdir(parents=True)
    run = run_cli("optimize", model, "-o", out, "--no-check")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["model.onnx", "model.onnx.data"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.onnx", "result.onnx.data"]
    assert tensor_digests(out)["W2"] == digests["W2"]
    # The written model loads with its data from its own folder, whatever the working dir.
    loaded = onnx.load(str(out))
    assert (
        onnx.numpy_helper.to_array(
            next(t for t in loaded.graph.initializer if t.name == "W2")
        ).shape
        == SMALL.shapes["W2"]
    )


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory) -> Iterator[dict[str, CliRun]]:
    """optimize then expand a 2.25 GB model once; the functional checks run inside."""
    assert LARGE.weight_bytes > 2**31
    folder = tmp_path_factory.mktemp("big")
    try:
        measured = _fold_then_expand(folder, LARGE)
    finally:  # pytest keeps old temp folders: do not leave 7 GB behind per run
        shutil.rmtree(folder, ignore_errors=True)
    for command, run in measured.items():
        print(
            f"\n{command}: peak RSS {run.peak_rss_bytes / 1e9:.2f} GB for "
            f"{LARGE.weight_bytes / 1e9:.2f} GB of weights "
            f"({run.peak_rss_bytes / LARGE.weight_bytes:.2f}x) in {run.seconds:.0f} s"
        )
        print("\n".join(run.phase_lines()))
    yield measured


@pytest.mark.slow
def test_model_over_2gb_goes_through_optimize_and_expand(big_runs) -> None:
    """No 2 GiB protobuf limit hit; external data beside OUT; weights bit-identical."""
    assert big_runs["optimize"].returncode == 0
    if _expand_available():
        assert big_runs["expand"].returncode == 0


@pytest.mark.slow
def test_model_over_2gb_peak_memory_under_1_5x_weights(big_runs) -> None:
    for command, run in big_runs.items():
        assert run.peak_rss_bytes < MEMORY_FACTOR * LARGE.weight_bytes, (
            f"{command}: peak RSS {run.peak_rss_bytes / 1e9:.2f} GB is over {MEMORY_FACTOR}x "
            f"the {LARGE.weight_bytes / 1e9:.2f} GB of weights:\n" + "\n".join(run.phase_lines())
        )


def test_ir_version_onnxruntime_cannot_read_is_checked_through_spill_copies(tmp_path: Path) -> None:
    """IR 14 (onnx 1.23's default, past onnxruntime's 13): the check runs on written copies of
    the model before and after the fold; the output keeps IR 14 and the untouched weight."""
    model, digests = write_model(tmp_path / "in", SMALL, ir_version=14)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    run = run_cli("optimize", model, "-o", out)
    assert run.returncode == 0, run.stderr
    assert "match" in run.stdout
    assert onnx.load(str(out), load_external_data=False).ir_version == 14
    assert tensor_digests(out)["W2"] == digests["W2"]
