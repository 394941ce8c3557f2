"""Bad input through the command line: exit 2, one line naming the problem, nothing written.

Every case runs ``python -m gconv_compile optimize IN -o OUT`` in a subprocess and checks:

* exit code 2;
* stderr is exactly one line, ``gconv-compile: error: ...``, naming the problem; no traceback;
* nothing is written: the folder holding the input (and OUT's folder) has the same files with
  the same bytes before and after, so no OUT, no stray temporary folder, input unchanged.

The tests run as root in CI containers, where ``chmod`` does not stop writes, so "a folder that
cannot be written" is a path whose parent is a regular file, a folder that does not exist, and
``/sys`` (which refuses ``mkdir`` even to root).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import split_conv_concat

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("GCONV_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "gconv_compile", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and 'link -> target' for symlinks) under folder."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            state[key] = "dir"
    return state


def _model(channels: int = 16, out_per_branch: int = 16) -> onnx.ModelProto:
    # Weights of 16x8x3x3 floats (4.6 kB) so that external data holds real tensors.
    return split_conv_concat(channels=channels, out_per_branch=out_per_branch, seed=7)


def _save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> None:
    onnx.save(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True,
        location=location, size_threshold=1024,
    )  # fmt: skip


def _relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model at ``path`` to ``location``."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)


# ------------------------------------------------------------------------------ case makers
# Each maker writes the input into ``work`` (the folder the test watches) and returns
# (IN, OUT); ``outside`` is a sibling folder for files that must live elsewhere.


def _truncated(work: Path, outside: Path) -> tuple[Path, Path]:
    data = _model().SerializeToString()
    (work / "m.onnx").write_bytes(data[: len(data) // 2])
    return work / "m.onnx", work / "out.onnx"


def _random_bytes(work: Path, outside: Path) -> tuple[Path, Path]:
    blob = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (work / "m.onnx").write_bytes(blob)
    return work / "m.onnx", work / "out.onnx"


def _text_file(work: Path, outside: Path) -> tuple[Path, Path]:
    (work / "m.onnx").write_text("ir_version: 10\ngraph { name: 'not really' }\n")
    return work / "m.onnx", work / "out.onnx"


def _empty_file(work: Path, outside: Path) -> tuple[Path, Path]:
    (work / "m.onnx").write_bytes(b"")
    return work / "m.onnx", work / "out.onnx"


def _fails_checker(work: Path, outside: Path) -> tuple[Path, Path]:
    proto = _model()
    proto.graph.node[1].input[0] = "no_such_value"  # the first Conv reads an undefined name
    onnx.save(proto, work / "m.onnx")
    return work / "m.onnx", work / "out.onnx"


def _ir_version(version: int) -> Callable[[Path, Path], tuple[Path, Path]]:
    def make(work: Path, outside: Path) -> tuple[Path, Path]:
        proto = _model()
        proto.ir_version = version
        onnx.save(proto, work / "m.onnx")
        return work / "m.onnx", work / "out.onnx"

    return make


def _opset_version(version: int) -> Callable[[Path, Path], tuple[Path, Path]]:
    def make(work: Path, outside: Path) -> tuple[Path, Path]:
        proto = _model()
        proto.opset_import[0].version = version
        onnx.save(proto, work / "m.onnx")
        return work / "m.onnx", work / "out.onnx"

    return make


def _external(location: str, prepare: Callable[[Path, Path], None] | None = None):
    def make(work: Path, outside: Path) -> tuple[Path, Path]:
        _save_external(_model(), work / "m.onnx")
        if prepare is not None:
            prepare(work, outside)
        _relocate(work / "m.onnx", location.format(outside=outside))
        return work / "m.onnx", work / "out.onnx"

    return make


def _move_weights_outside(work: Path, outside: Path) -> None:
    (work / "weights.bin").rename(outside / "weights.bin")


def _symlink_file_outside(work: Path, outside: Path) -> None:
    _move_weights_outside(work, outside)
    (work / "link.bin").symlink_to(outside / "weights.bin")


def _symlink_folder_outside(work: Path, outside: Path) -> None:
    _move_weights_outside(work, outside)
    (work / "sub").symlink_to(outside, target_is_directory=True)


def _truncate_weights(work: Path, outside: Path) -> None:
    blob = (work / "weights.bin").read_bytes()
    (work / "weights.bin").write_bytes(blob[: len(blob) // 2])


def _out_is_in(work: Path, outside: Path) -> tuple[Path, Path]:
    onnx.save(_model(), work / "m.onnx")
    return work / "m.onnx", work / "m.onnx"


def _out_is_in_respelled(work: Path, outside: Path) -> tuple[Path, Path]:
    onnx.save(_model(), work / "m.onnx")
    return work / "m.onnx", work / ".." / work.name / "." / "m.onnx"


def _out_is_hard_link_to_in(work: Path, outside: Path) -> tuple[Path, Path]:
    onnx.save(_model(), work / "m.onnx")
    os.link(work / "m.onnx", work / "alias.onnx")
    return work / "m.onnx", work / "alias.onnx"


def _out_data_overwrites_in_data(work: Path, outside: Path) -> tuple[Path, Path]:
    # OUT=out.onnx would write its weights to out.onnx.data, which is the input's weight file.
    _save_external(_model(), work / "m.onnx", location="out.onnx.data")
    return work / "m.onnx", work / "out.onnx"


def _out_parent_is_file(work: Path, outside: Path) -> tuple[Path, Path]:
    onnx.save(_model(), work / "m.onnx")
    return work / "m.onnx", work / "m.onnx" / "out.onnx"


def _out_parent_missing(work: Path, outside: Path) -> tuple[Path, Path]:
    onnx.save(_model(), work / "m.onnx")
    return work / "m.onnx", work / "no_such_folder" / "out.onnx"


def _out_is_folder(work: Path, outside: Path) -> tuple[Path, Path]:
    onnx.save(_model(), work / "m.onnx")
    (work / "taken").mkdir()
    return work / "m.onnx", work / "taken"


def _out_name_too_long(work: Path, outside: Path) -> tuple[Path, Path]:
    # The model name fits (255 bytes), its external data name (+".data") does not: the save
    # fails half way, after the check, and must leave nothing behind.
    _save_external(_model(), work / "m.onnx")
    return work / "m.onnx", work / ("o" * 250 + ".onnx")


def _in_missing(work: Path, outside: Path) -> tuple[Path, Path]:
    return work / "missing.onnx", work / "out.onnx"


def _in_is_folder(work: Path, outside: Path) -> tuple[Path, Path]:
    (work / "folder.onnx").mkdir()
    return work / "folder.onnx", work / "out.onnx"


# (id, maker, words the error line must contain)
CASES = [
    ("truncated-file", _truncated, ["not an ONNX model"]),
    ("random-bytes", _random_bytes, ["not an ONNX model"]),
    ("text-file", _text_file, ["not an ONNX model", "text file"]),
    ("empty-file", _empty_file, ["empty file"]),
    ("fails-onnx-checker", _fails_checker, ["fails the ONNX checker", "no_such_value"]),
    ("ir-version-too-new", _ir_version(99), ["IR version 99", "not supported"]),
    ("ir-version-too-old", _ir_version(2), ["IR version 2", "not supported"]),
    ("opset-too-new", _opset_version(99), ["opset 99", "not supported"]),
    ("external-data-missing", _external("gone.bin"), ["'gone.bin'", "missing"]),
    (
        "external-data-truncated",
        _external("weights.bin", _truncate_weights),
        ["'weights.bin'", "truncated"],
    ),
    (
        "external-data-dotdot",
        _external("../outside/weights.bin", _move_weights_outside),
        ["'../outside/weights.bin'", "leaves the model folder"],
    ),
    (
        "external-data-absolute-path",
        _external("{outside}/weights.bin", _move_weights_outside),
        ["weights.bin", "absolute path"],
    ),
    (
        "external-data-symlink-file-leaves-folder",
        _external("link.bin", _symlink_file_outside),
        ["'link.bin'", "outside the model folder"],
    ),
    (
        "external-data-symlink-folder-leaves-folder",
        _external("sub/weights.bin", _symlink_folder_outside),
        ["'sub/weights.bin'", "outside the model folder"],
    ),
    ("in-missing", _in_missing, ["missing.onnx", "no such file"]),
    ("in-is-a-folder", _in_is_folder, ["folder.onnx", "not a regular file"]),
    ("out-equals-in", _out_is_in, ["overwrite the input"]),
    ("out-equals-in-other-spelling", _out_is_in_respelled, ["overwrite the input"]),
    ("out-is-hard-link-to-in", _out_is_hard_link_to_in, ["overwrite the input"]),
    (
        "out-external-data-is-in-weights",
        _out_data_overwrites_in_data,
        ["out.onnx.data", "overwrite the input's weights"],
    ),
    ("out-parent-is-a-file", _out_parent_is_file, ["m.onnx", "not a folder"]),
    ("out-parent-missing", _out_parent_missing, ["no_such_folder", "does not exist"]),
    ("out-is-a-folder", _out_is_folder, ["taken", "is a folder"]),
    ("out-name-too-long-for-its-data", _out_name_too_long, ["cannot write", "too long"]),
]


def _assert_one_error_line(result: subprocess.CompletedProcess, words: list[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("gconv-compile: error: "), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in {line!r}"
    return line


@pytest.mark.parametrize(("maker", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, maker, words) -> None:
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    in_path, out_path = maker(work, outside)
    before = _snapshot(tmp_path)

    result = _run_cli("optimize", in_path, "-o", out_path, cwd=work)

    _assert_one_error_line(result, words)
    assert _snapshot(tmp_path) == before, "files were written, removed or changed"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux /sys")
def test_out_in_folder_the_os_refuses(tmp_path: Path) -> None:
    """/sys refuses mkdir even to root: the save fails after the check, cleanly."""
    try:
        probe = tempfile.mkdtemp(dir="/sys")
    except OSError:
        pass
    else:  # pragma: no cover - some sandbox lets us write there
        os.rmdir(probe)
        pytest.skip("/sys is writable here")
    onnx.save(_model(), tmp_path / "m.onnx")
    before = _snapshot(tmp_path)

    result = _run_cli("optimize", tmp_path / "m.onnx", "-o", "/sys/out.onnx", cwd=tmp_path)

    _assert_one_error_line(result, ["/sys", "cannot write"])
    assert _snapshot(tmp_path) == before
    assert not Path("/sys/out.onnx").exists()


def test_good_input_is_accepted(tmp_path: Path) -> None:
    """The same model, well formed, goes through: the cases above fail for their defect alone."""
    _save_external(_model(), tmp_path / "m.onnx")
    before = _snapshot(tmp_path)

    result = _run_cli("optimize", tmp_path / "m.onnx", "-o", tmp_path / "out.onnx", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    after = _snapshot(tmp_path)
    assert {k: after[k] for k in before} == before, "the input changed"
    assert sorted(set(after) - set(before)) == ["out.onnx", "out.onnx.data"]
