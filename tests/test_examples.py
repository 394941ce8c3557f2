"""The examples run as their READMEs say: the commands are read from each README's ```sh blocks
(as onnx-graphsurgeon's example tests do) and run in a temporary copy, so README and test cannot
drift apart. Then what the README claims about the results is checked."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# How a README's programs run here: this interpreter, and the CLI of the package under test.
PROGRAMS = {"python": [sys.executable], "gconv-compile": [sys.executable, "-m", "gconv_compile"]}


def fenced_blocks(example: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of each fenced code block of the example's README, in order."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in (EXAMPLES / example / "README.md").read_text().splitlines():
        if line.startswith("```") and current is None:
            current = []
            blocks.append((line[3:].strip(), current))
        elif line.startswith("```"):
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_commands(example: str) -> list[str]:
    """The shell commands of the README's ```sh blocks, one per line, comments dropped."""
    lines = [line for info, block in fenced_blocks(example) if info == "sh" for line in block]
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in lines]
    return [c for c in commands if c and not c.startswith("#")]


def readme_output(example: str) -> list[str]:
    """The lines of the README's plain ``` blocks: the output it shows."""
    return [line for info, block in fenced_blocks(example) if not info for line in block]


def run_readme(example: str, tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run the README's commands, in order, from a folder holding a copy of the example."""
    shutil.copytree(EXAMPLES / example, tmp_path / "examples" / example)
    results = {}
    for command in readme_commands(example):
        program, *args = shlex.split(command)
        assert program in PROGRAMS, f"README runs an unknown program: {command}"
        done = subprocess.run(
            PROGRAMS[program] + args, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
        results[command] = done
    return results


def _output_of(results: dict, prefix: str) -> str:
    (command,) = [c for c in results if c.startswith(prefix)]
    return results[command].stdout


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))
def test_every_example_readme_has_commands(example):
    assert readme_commands(example), f"examples/{example}/README.md shows no ```sh commands"


def test_01_chunked_conv_folds_every_block(tmp_path):
    results = run_readme("01_chunked_conv", tmp_path)
    out = _output_of(results, "gconv-compile optimize")
    assert out.count("folded ") == 3 and "nodes 104 -> 32" in out
    folded = onnx.load(tmp_path / "folded.onnx")
    groups = [a.i for n in folded.graph.node for a in n.attribute if a.name == "group"]
    assert sorted(groups).count(8) == 3
    assert (tmp_path / "optimize.json").is_file()


def test_02_expand_for_npu_round_trips(tmp_path):
    results = run_readme("02_expand_for_npu", tmp_path)
    npu = _output_of(results, "gconv-compile optimize grouped_block.onnx")
    assert npu.count("expanded ") == 2 and "depthwise" in npu
    shown = readme_output("02_expand_for_npu")  # the output the README shows
    assert len(shown) == 4
    for line in shown:
        assert line.strip() in npu
    assert "32x the multiply-adds" in _output_of(results, "gconv-compile expand")
    assert "2 blocks folded" in _output_of(results, "gconv-compile optimize npu.onnx")
    original = {t.name: t for t in onnx.load(tmp_path / "grouped_block.onnx").graph.initializer}
    back = onnx.load(tmp_path / "back.onnx")
    weights = [n.input[1] for n in back.graph.node if n.op_type == "Conv"]
    restored = {t.name: t for t in back.graph.initializer}
    # Every folded-back weight equals one of the original grouped weights, bit for bit.
    originals = [onnx.numpy_helper.to_array(t).tobytes() for t in original.values()]
    for name in weights:
        assert onnx.numpy_helper.to_array(restored[name]).tobytes() in originals
