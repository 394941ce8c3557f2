"""Regenerate docs/understanding_groups.md and its picture from real ``gconv-compile explain`` runs.

Usage::

    .venv/bin/python scripts/make_groups_docs.py            # rewrite the doc and docs/img/*.svg
    .venv/bin/python scripts/make_groups_docs.py --check    # exit 1 if any of them is stale
    .venv/bin/python scripts/make_groups_docs.py --model mobile_block.onnx   # only the model

Every block of output in the doc is what the command printed when this script ran it, so the
numbers cannot drift from the code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gconv_compile import cli  # noqa: E402
from gconv_compile.files import write_text_atomic  # noqa: E402

DOC = ROOT / "docs" / "understanding_groups.md"
PICTURE = ROOT / "docs" / "img" / "groups_in16_out16_g2.svg"
MODEL_NAME = "mobile_block.onnx"


def build_mobile_block(seed: int = 0) -> onnx.ModelProto:
    """A small model with every case the doc talks about.

    X[N,16,32,32] -> depthwise 3x3 (groups=16) -> BatchNorm -> Relu -> pointwise 1x1 16->32
    -> Relu -> Split [16, 16] -> 2 x Conv 3x3 16->16 -> Concat        (folds into group=2)
    -> Split [8, 24] -> Conv 8->8, Conv 24->24 -> Concat              (uneven: does not fold)
    -> ConvTranspose 32->16, kernel 4, stride 2, group=2 -> Y[N,16,64,64]
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
        return name

    def ints(name: str, values: list[int]) -> str:
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    nodes = [
        helper.make_node("Conv", ["X", weight("dw.w", 16, 1, 3, 3), weight("dw.b", 16)], ["dw"],
                         name="dw_conv", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["dw", weight("bn.scale", 16), weight("bn.bias", 16),
                         weight("bn.mean", 16), "bn.var"], ["bn"], name="dw_bn"),
        helper.make_node("Relu", ["bn"], ["dw_act"], name="dw_relu"),
        helper.make_node("Conv", ["dw_act", weight("pw.w", 32, 16, 1, 1), weight("pw.b", 32)],
                         ["pw"], name="pw_conv"),
        helper.make_node("Relu", ["pw"], ["pw_act"], name="pw_relu"),
        helper.make_node("Split", ["pw_act", ints("even", [16, 16])], ["a0", "a1"], axis=1,
                         name="split_even"),
        helper.make_node("Conv", ["a0", weight("c0.w", 16, 16, 3, 3)], ["y0"], name="branch0",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a1", weight("c1.w", 16, 16, 3, 3)], ["y1"], name="branch1",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["y0", "y1"], ["cat0"], axis=1, name="concat_even"),
        helper.make_node("Split", ["cat0", ints("uneven", [8, 24])], ["b0", "b1"], axis=1,
                         name="split_uneven"),
        helper.make_node("Conv", ["b0", weight("d0.w", 8, 8, 3, 3)], ["z0"], name="branch2",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b1", weight("d1.w", 24, 24, 3, 3)], ["z1"], name="branch3",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["z0", "z1"], ["cat1"], axis=1, name="concat_uneven"),
        helper.make_node("ConvTranspose", ["cat1", weight("up.w", 32, 8, 4, 4)], ["Y"],
                         name="upsample", group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
    ]  # fmt: skip
    inits.append(numpy_helper.from_array(rng.uniform(0.5, 2.0, 16).astype(np.float32), "bn.var"))
    graph = helper.make_graph(
        nodes,
        "mobile_block",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16, 32, 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 16, 64, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10  # onnxruntime reads at most IR 13
    onnx.checker.check_model(model)
    return model


def run(command: str) -> tuple[int, str]:
    """Run ``gconv-compile ARGS`` in-process; return the exit code and stdout + stderr."""
    args = shlex.split(command)
    assert args[0] == "gconv-compile"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(args[1:])
    return code, (out.getvalue() + err.getvalue()).rstrip("\n")


def block(command: str, expect: int = 0) -> str:
    code, text = run(command)
    if code != expect:
        raise SystemExit(f"{command}: exit {code}, expected {expect}\n{text}")
    suffix = f"   # exit code {code}" if code else ""
    return f"```console\n$ {command}{suffix}\n{text}\n```"


def render(commands_dir: Path, root: Path = ROOT) -> str:
    """The whole doc, with every output block produced now.

    Args:
        commands_dir: An empty folder to run the model example in.
        root: Where the ``--conv`` examples run; the picture is written to
            ``root/docs/img/`` (tests pass a scratch folder to leave the repository alone).
    """
    picture = PICTURE.relative_to(ROOT).as_posix()
    (root / picture).parent.mkdir(parents=True, exist_ok=True)
    with _cwd(root):
        dense_16 = block(
            f"gconv-compile explain --conv in=16,out=16,groups=2,kernel=1 --svg {picture}"
        )
        invalid = block("gconv-compile explain --conv in=3,out=8,groups=3", expect=2)
        depthwise = block("gconv-compile explain --conv in=32,out=32,groups=32,kernel=3x3")
        transpose = block(
            "gconv-compile explain --conv in=16,out=32,groups=2,kernel=4,stride=2 --transpose"
        )
    onnx.save(build_mobile_block(), commands_dir / MODEL_NAME)
    with _cwd(commands_dir):
        model = block(f"gconv-compile explain {MODEL_NAME}")
    return TEMPLATE.format(
        picture=PICTURE.relative_to(DOC.parent).as_posix(),
        readme_picture=picture,
        dense_16=dense_16,
        invalid=invalid,
        depthwise=depthwise,
        transpose=transpose,
        model=model,
        model_name=MODEL_NAME,
    )


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


TEMPLATE = """\
<!-- Generated by scripts/make_groups_docs.py from real `gconv-compile explain` runs: edit the
script, not this file. Pasted into README.md, the picture path becomes {readme_picture}. -->

## Understanding groups

`groups` (PyTorch, Keras), `group` (ONNX) or `feature_group_count` (XLA) cuts a convolution
into G equal, independent convolutions: group g reads only its own share of the input channels,
`[g*in/G, (g+1)*in/G)`, and writes only its own share of the output channels,
`[g*out/G, (g+1)*out/G)`. G=1 is the ordinary dense convolution; G=in_channels is a depthwise
convolution. `gconv-compile explain` answers the usual questions from the numbers, for a
setting (`--conv`) or for every convolution in your model. Everything below is its real output.

### Conv2d(16, 16, 1, groups=2)

{dense_16}

![Conv2d(16, 16, 1, groups=2): input channels 0-7 feed only output channels 0-7, 8-15 only 8-15]({picture})

Why is the weight `[16, 8, 1, 1]` and not two `[8, 8, 1, 1]` tensors? It is those two tensors,
stacked: rows 0-7 of the weight are group 0's kernels and rows 8-15 are group 1's. Axis 1 is 8,
not 16, because each output channel reads only the 8 input channels of its own group. The
"same as" lines spell out the identical computation as Split, two Convs and Concat; that is the
pattern `gconv-compile optimize` folds back into one grouped Conv. Add `--svg FILE` for the
picture (above 64 channels it draws the block-diagonal weight mask instead) and `--json` for
machines.

### An invalid setting: in=3, out=8, groups=3

{invalid}

Each group needs a whole, equal share of both the input and the output channels, so `groups`
must divide both counts. 3 divides in=3 but not out=8; the only `groups` that divides 3 and 8
is 1. The message says what would work instead, including two ways to get exactly 8 outputs.
Zero, negative, too many groups, and malformed or unknown keys are refused the same way: exit
code 2 and one short message, never a traceback.

### groups = in_channels: depthwise

{depthwise}

With groups = in_channels each input channel is filtered on its own. With out = k x in it is
"depthwise with multiplier k", Keras's `DepthwiseConv2D(depth_multiplier=k)`
(try `--conv in=32,out=64,groups=32,kernel=3`).

### ConvTranspose

{transpose}

ConvTranspose stores its weight the other way round, `[in, out/groups, k...]`, so the groups are
stacked along the input channels. Its cost is counted per input pixel: each input pixel is
scattered into a kernel-sized window of the output.

### Depthwise-separable convolutions in a model

A depthwise-separable convolution is `Conv2d(nin, nin, 3, groups=nin)` followed by
`Conv2d(nin, nout, 1)`. `{model_name}` (built with `onnx.helper` by
`scripts/make_groups_docs.py --model {model_name}`) has one with nin=16, nout=32, a
split-conv-concat block the fold pass would fold, an uneven one it would not, and a grouped
ConvTranspose. Given a model, `explain` lists every Conv/ConvTranspose with its cost at the
model's static shapes (symbolic dims such as the batch `N` stay as names), runs the fold pass on
a copy to say which split-conv-concat blocks it would fold and why not, and flags
depthwise + pointwise pairs with their saving against one dense convolution:

{model}

`--node NAME` explains one of those convolutions like `--conv` does, and with `--svg FILE`
draws it.
"""


README = ROOT / "README.md"
README_START = "<!-- groups:start"
README_END = "<!-- groups:end -->"


def stale_files(workdir: Path) -> list[str]:
    """The generated files (doc, picture, README's section) that differ from what the script
    would write now; ``workdir`` is an empty scratch folder."""
    (workdir / "run").mkdir()
    text = render(workdir / "run", root=workdir)
    picture = PICTURE.relative_to(ROOT)
    readme = README.read_text()
    checks = {
        DOC.relative_to(ROOT).as_posix(): lambda: DOC.read_text() == text,
        picture.as_posix(): lambda: PICTURE.read_bytes() == (workdir / picture).read_bytes(),
        "README.md": lambda: readme_with_section(readme, text) == readme,
    }
    return [name for name, same in checks.items() if not _exists_and(same)]


def _exists_and(same) -> bool:
    try:
        return same()
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", metavar="OUT.onnx", help="only write the example model")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.model:
        onnx.save(build_mobile_block(), args.model)
        print(f"wrote {args.model}")
        return 0
    if args.check:
        with tempfile.TemporaryDirectory(prefix="groups-docs-") as workdir:
            stale = stale_files(Path(workdir))
        if stale:
            print(f"stale: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
            return 1
        print("docs/understanding_groups.md, its picture and README's section are up to date")
        return 0
    PICTURE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="groups-docs-") as workdir:
        text = render(Path(workdir))
    write_text_atomic(DOC, text)
    write_text_atomic(README, readme_with_section(README.read_text(), text))
    print(f"wrote {DOC.relative_to(ROOT)}, {PICTURE.relative_to(ROOT)} and README's section")
    return 0


def readme_with_section(readme: str, doc: str) -> str:
    """README.md with its "Understanding groups" section replaced by ``doc`` (paths from root)."""
    body = doc.split("-->", 1)[1].strip().replace("](img/", "](docs/img/")
    start = readme.index(README_START)
    start = readme.index("\n", start) + 1
    end = readme.index(README_END)
    return readme[:start] + body + "\n" + readme[end:]


if __name__ == "__main__":
    sys.exit(main())
