"""Small-width real architectures, written by hand, for scripts/make_real_fixtures.py.

Each ``Architecture`` carries the verdict gconv-compile SHOULD give on its ONNX export
(``Verdict``), judged from what the architecture computes, not from what the tool does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Building blocks


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act=nn.ReLU, dim=2):
    """Conv (no bias) -> BatchNorm -> optional activation, as torchvision-style code writes it."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
    layers = [conv(cin, cout, k, stride, k // 2, groups=groups, bias=False), norm(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ChunkConvs(nn.Module):
    """A grouped conv written as ``torch.chunk`` -> one conv per chunk -> ``torch.cat``."""

    def __init__(self, cin, cout, groups, k=1, stride=1, act=nn.ReLU, dim=2, split=False):
        super().__init__()
        self.groups, self.split, self.width = groups, split, cin // groups
        self.convs = nn.ModuleList(
            conv_bn(cin // groups, cout // groups, k, stride, act=act, dim=dim)
            for _ in range(groups)
        )

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        chunks = torch.split(x, self.width, 1) if self.split else torch.chunk(x, self.groups, 1)
        return [conv(part) for conv, part in zip(self.convs, chunks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts(x), 1)


# ---------------------------------------------------------------------------------------------
# Architectures


class AlexNetCaffe(nn.Module):
    """Caffe AlexNet: conv2/4/5 are group=2, written as two channel slices; LRN; view flatten."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, 2, 2)
        self.conv2 = nn.ModuleList(nn.Conv2d(8, 12, 5, 1, 2) for _ in range(2))
        self.conv3 = nn.Conv2d(24, 24, 3, 1, 1)
        self.conv4 = nn.ModuleList(nn.Conv2d(12, 12, 3, 1, 1) for _ in range(2))
        self.conv5 = nn.ModuleList(nn.Conv2d(12, 8, 3, 1, 1) for _ in range(2))
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, classes))

    @staticmethod
    def _group2(convs: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        half = x.size(1) // 2
        return torch.relu(torch.cat([convs[0](x[:, :half]), convs[1](x[:, half:])], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.lrn(torch.relu(self.conv1(x))))
        x = self.pool(self.lrn(self._group2(self.conv2, x)))
        x = torch.relu(self.conv3(x))
        x = self.pool(self._group2(self.conv5, self._group2(self.conv4, x)))
        return self.fc(x.view(x.size(0), -1))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck, form (b): reduce, chunk/split -> cardinality x 3x3 conv -> cat."""

    def __init__(self, cin=32, cout=32, cardinality=8, width=4, stride=1, split=False) -> None:
        super().__init__()
        inner = cardinality * width
        self.reduce = conv_bn(cin, inner, 1)
        self.branches = ChunkConvs(inner, inner, cardinality, 3, stride, act=None, split=split)
        self.bn = nn.BatchNorm2d(inner)
        self.expand = conv_bn(inner, cout, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.branches(self.reduce(x))))
        return torch.relu(self.expand(y) + self.shortcut(x))


class ResNeXtNative(nn.Module):
    """ResNeXt bottleneck, form (c): the same block with one ``groups=8`` Conv2d."""

    def __init__(self, channels: int = 32, cardinality: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(channels, channels, 1),
            conv_bn(channels, channels, 3, groups=cardinality),
            conv_bn(channels, channels, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet v1 unit: gconv1x1 (chunk/convs/cat), shuffle, dw3x3, gconv1x1, add or cat."""

    def __init__(self, cin: int, cout: int, groups: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        branch_out = cout - cin if stride == 2 else cout
        mid = cout // 4
        self.gconv1 = ChunkConvs(cin, mid, groups)
        self.dw = conv_bn(mid, mid, 3, stride, groups=mid, act=None)
        self.gconv2 = ChunkConvs(mid, branch_out, groups, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(channel_shuffle(self.gconv1(x), self.groups))
        if self.stride == 2:
            # The branch is itself a cat of per-group convs: TorchScript merges the two cats.
            shortcut = nn.functional.avg_pool2d(x, 3, 2, 1)
            return torch.relu(torch.cat([shortcut, torch.cat(self.gconv2.parts(y), 1)], 1))
        return torch.relu(self.gconv2(y) + x)


class ShuffleNetV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Sequential(ShuffleV1Unit(24, 48, stride=2), ShuffleV1Unit(48, 48))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


class SharedConvChunks(nn.Module):
    """One BN-fused Conv2d applied to every chunk (one weight, used 4 times)."""

    def __init__(self, channels: int = 32, chunks: int = 4) -> None:
        super().__init__()
        self.chunks = chunks
        self.conv = conv_bn(channels // chunks, channels // chunks, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(part) for part in torch.chunk(x, self.chunks, 1)], 1)


class TDNN(nn.Module):
    """x-vector style TDNN: Conv1d frame layers, one of them as grouped branches, stats pooling."""

    def __init__(self, feats: int = 32, width: int = 64, groups: int = 4) -> None:
        super().__init__()
        self.frame1 = nn.Conv1d(feats, width, 5, padding=2)
        self.branches = nn.ModuleList(
            nn.Conv1d(width // groups, width // groups, 3, padding=2, dilation=2)
            for _ in range(groups)
        )
        self.bn1, self.bn2 = nn.BatchNorm1d(width), nn.BatchNorm1d(width)
        self.frame3 = nn.Conv1d(width, width, 1)
        self.embed = nn.Linear(2 * width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(torch.relu(self.frame1(x)))  # Kaldi order: affine, ReLU, BatchNorm
        parts = torch.chunk(x, len(self.branches), 1)
        x = torch.cat([conv(p) for conv, p in zip(self.branches, parts)], 1)
        x = torch.relu(self.frame3(self.bn2(torch.relu(x))))
        return self.embed(torch.cat([x.mean(2), x.std(2)], 1))


class ResNeXt3D(nn.Module):
    """ResNeXt-3D bottleneck (video): Conv3d 3x3x3 branches on chunks."""

    def __init__(self, channels: int = 16, cardinality: int = 4, width: int = 4) -> None:
        super().__init__()
        inner = cardinality * width
        self.reduce = conv_bn(channels, inner, 1, dim=3)
        self.branches = ChunkConvs(inner, inner, cardinality, 3, dim=3)
        self.expand = conv_bn(inner, channels, 1, act=None, dim=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.expand(self.branches(self.reduce(x))) + x)


class RegNetXBlock(nn.Module):
    """RegNetX X-block: 1x1, 3x3 with ``groups=width/8`` (native), 1x1, residual."""

    def __init__(self, cin: int, cout: int, stride: int = 1, group_width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(cin, cout, 1),
            conv_bn(cout, cout, 3, stride, groups=cout // group_width),
            conv_bn(cout, cout, 1, act=None),
        )
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class RegNetX(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(RegNetXBlock(32, 48, stride=2), RegNetXBlock(48, 48))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: expand 1x1, depthwise 3x3, project 1x1 (ReLU6)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6) -> None:
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, cout, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Wav2Vec2PosConv(nn.Module):
    """wav2vec2's positional conv: Conv1d(groups=16, even kernel, pad k/2), SamePad, GELU.

    ``branchy`` writes the grouped conv as chunk -> 16 Conv1d -> cat. Input is (B, T, C).
    """

    def __init__(self, channels=64, kernel=16, groups=16, branchy=False) -> None:
        super().__init__()
        self.groups, self.branchy = groups, branchy
        if branchy:
            self.convs = nn.ModuleList(
                nn.Conv1d(channels // groups, channels // groups, kernel, padding=kernel // 2)
                for _ in range(groups)
            )
        else:
            conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=groups)
            self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        if self.branchy:
            parts = torch.chunk(y, self.groups, 1)
            y = torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)
        else:
            y = self.conv(y)
        y = nn.functional.gelu(y[:, :, :-1])  # SamePad: an even kernel gives one frame too many
        return self.norm(x + y.transpose(1, 2))


class MixNetBlock(nn.Module):
    """MixNet block: expand 1x1, MixConv (depthwise kernels 3/5/7, or 3x3 dilated 1/2/3, on
    channel splits), BN, SiLU, project 1x1, residual.

    ``hidden`` not divisible by 3 splits as timm's ``_split_channels`` does: the first part
    takes the remainder (50 -> 18, 16, 16), passed to ``torch.split`` as a list of sizes.
    """

    def __init__(self, channels=24, hidden=48, dilated=False) -> None:
        super().__init__()
        sizes = [hidden // 3] * 3
        sizes[0] += hidden - sum(sizes)
        self.split_arg = sizes[0] if len(set(sizes)) == 1 else sizes
        self.expand = conv_bn(channels, hidden, 1, act=nn.SiLU)
        specs = [(3, d, d) for d in (1, 2, 3)] if dilated else [(k, 1, k // 2) for k in (3, 5, 7)]
        self.mix = nn.ModuleList(
            nn.Conv2d(width, width, k, padding=p, dilation=d, groups=width, bias=False)
            for width, (k, d, p) in zip(sizes, specs)
        )
        self.bn = nn.BatchNorm2d(hidden)
        self.project = conv_bn(hidden, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(self.expand(x), self.split_arg, 1)
        y = torch.cat([conv(p) for conv, p in zip(self.mix, parts)], 1)
        return x + self.project(nn.functional.silu(self.bn(y)))


class Res2NetBlock(nn.Module):
    """Res2Net bottleneck: y1 = K1(x1), yi = Ki(xi + y(i-1)), x4 passes; the convs chain."""

    def __init__(self, channels: int = 32, scale: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.reduce = conv_bn(channels, channels, 1)
        self.convs = nn.ModuleList(
            conv_bn(channels // scale, channels // scale, 3) for _ in range(scale - 1)
        )
        self.expand = conv_bn(channels, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(self.reduce(x), self.scale, 1)
        outs, y = [], None
        for i, conv in enumerate(self.convs):
            y = conv(parts[i] if y is None else parts[i] + y)
            outs.append(y)
        y = torch.cat([*outs, parts[-1]], 1)
        return torch.relu(self.expand(y) + x)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 unit: stride 1 splits channels in two, one half passes; stride 2 runs two
    branches on the same input. Then cat and channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        branch_in = cin if stride == 2 else cin // 2
        if stride == 2:
            self.branch1 = nn.Sequential(
                conv_bn(cin, cin, 3, 2, groups=cin, act=None), conv_bn(cin, half, 1)
            )
        self.branch2 = nn.Sequential(
            conv_bn(branch_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, act=None),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, 1)
            y = torch.cat([x1, self.branch2(x2)], 1)
        else:
            y = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(y, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.units = nn.Sequential(ShuffleV2Unit(32, 64, 2), ShuffleV2Unit(64, 64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


class GhostModule(nn.Module):
    """GhostNet: a primary 1x1 conv and a cheap depthwise 3x3 of its output, concatenated."""

    def __init__(self, cin: int, cout: int, relu: bool = True) -> None:
        super().__init__()
        self.cout = cout
        init = (cout + 1) // 2
        act = nn.ReLU if relu else None
        self.primary = conv_bn(cin, init, 1, act=act)
        self.cheap = conv_bn(init, init, 3, groups=init, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, : self.cout]


class GhostBottleneck(nn.Module):
    def __init__(self, channels: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.ghost1 = GhostModule(channels, hidden)
        self.ghost2 = GhostModule(hidden, channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ghost2(self.ghost1(x))


class CSPBlock(nn.Module):
    """CSP / C3-style block: 1x1, chunk in two; path a = 1x1 conv, path b = a residual
    bottleneck then a 1x1 conv; cat; 1x1. Path b is not a single conv of its split part."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        half = channels // 2
        self.cv1 = conv_bn(channels, channels, 1, act=nn.SiLU)
        self.path_a = conv_bn(half, half, 1, act=nn.SiLU)
        self.bottleneck = nn.Sequential(
            conv_bn(half, half, 1, act=nn.SiLU), conv_bn(half, half, 3, act=nn.SiLU)
        )
        self.path_b = conv_bn(half, half, 1, act=nn.SiLU)
        self.cv3 = conv_bn(channels, channels, 1, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)
        b = self.path_b(b + self.bottleneck(b))
        return self.cv3(torch.cat([self.path_a(a), b], 1))


class Inception(nn.Module):
    """Naive Inception (1x1, 3x3, 5x5 'same' convs on one input) then an Inception-v1 module
    (1x1; 1x1->3x3; 1x1->5x5; maxpool->1x1). Parallel convs of the SAME tensor, no split."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.naive = nn.ModuleList(conv_bn(channels, 8, k) for k in (1, 3, 5))
        c = 24
        self.b1 = conv_bn(c, 8, 1)
        self.b2 = nn.Sequential(conv_bn(c, 8, 1), conv_bn(8, 8, 3))
        self.b3 = nn.Sequential(conv_bn(c, 4, 1), conv_bn(4, 8, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(c, 8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([conv(x) for conv in self.naive], 1)
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


# ---------------------------------------------------------------------------------------------
# What each architecture is, and the verdict gconv-compile should give on it


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The correct behaviour of gconv-compile on a fixture, judged from the architecture.

    Attributes:
        folds: split-conv-concat blocks ``optimize`` should fold.
        groups: the ``group`` of each folded Conv, sorted.
        refusals: substrings, each of which some skip reason of ``optimize`` should contain
            (one per must-not-fold block; any listed alternative, separated by ``|``, will do).
        grouped: native grouped, non-depthwise Convs in the file (``expand`` and
            ``--target generic-npu`` should split each).
        depthwise: native depthwise Convs (``expand`` splits them by default; generic-npu runs
            them, so leaves them).
        why: the judgement, in words.
    """

    folds: int = 0
    groups: tuple[int, ...] = ()
    refusals: tuple[str, ...] = ()
    grouped: int = 0
    depthwise: int = 0
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # without the batch dim
    seed: int
    verdict: Verdict
    int8: bool = False


NOT_SPLIT = "not a channel Split or Slice"
NOT_CONV = "not produced by a Conv branch"
ARCHITECTURES = (
    Architecture("alexnet_caffe", AlexNetCaffe, (3, 32, 32), 11, Verdict(
        3, (2, 2, 2), why="folds 3 blocks to group=2: conv2/4/5 are Caffe group=2 convs "
        "written as two channel slices; the ReLU after each cat moves after the grouped Conv")),
    Architecture("resnext_chunk", ResNeXtBlock, (32, 16, 16), 12, Verdict(
        1, (8,), why="folds 1 block to group=8 (torch.chunk, BN after the cat stays)"),
        int8=True),
    Architecture("resnext_split", lambda: ResNeXtBlock(32, 64, stride=2, split=True),
        (32, 16, 16), 13, Verdict(1, (8,), why="folds 1 block of stride-2 convs to group=8 "
        "(torch.split)")),
    Architecture("resnext_native", ResNeXtNative, (32, 16, 16), 14, Verdict(
        grouped=1, why="nothing to fold (groups=8 already); expand splits the grouped Conv"),
        int8=True),
    Architecture("shufflenet_v1", ShuffleNetV1, (24, 16, 16), 15, Verdict(
        4, (3, 3, 3, 3), depthwise=2, why="folds 4 blocks to group=3 (two grouped 1x1 convs per "
        "unit); in the stride-2 unit the 2nd block shares its Concat with the avg-pool shortcut "
        "(TorchScript merges the nested cats), which should still fold as a run of the "
        "Concat's inputs"), int8=True),
    Architecture("shared_conv_chunks", SharedConvChunks, (32, 16, 16), 16, Verdict(
        1, (4,), why="folds 1 block to group=4: one conv weight used by every chunk is the "
        "grouped weight tiled 4 times (TorchScript reads the shared weight through Identity)")),
    Architecture("tdnn", TDNN, (32, 48), 17, Verdict(
        1, (4,), why="folds 1 block of dilated Conv1d to group=4")),
    Architecture("resnext3d", ResNeXt3D, (16, 4, 8, 8), 18, Verdict(
        1, (4,), why="folds 1 block of Conv3d (+BN+ReLU per branch) to group=4")),
    Architecture("regnetx", RegNetX, (32, 16, 16), 19, Verdict(
        grouped=2, why="nothing to fold (native groups=6); expand splits 2 grouped Convs"),
        int8=True),
    Architecture("mobilenetv2", MobileNetV2, (16, 16, 16), 20, Verdict(
        depthwise=2, why="nothing to fold; expand splits the 2 depthwise Convs, generic-npu "
        "keeps them (it runs depthwise)"), int8=True),
    Architecture("wav2vec2_posconv", Wav2Vec2PosConv, (32, 64), 21, Verdict(
        grouped=1, why="nothing to fold (native groups=16 Conv1d, weight-normed, k=16 pad 8); "
        "expand splits it")),
    Architecture("wav2vec2_posconv_branchy", lambda: Wav2Vec2PosConv(branchy=True), (32, 64),
        22, Verdict(1, (16,), why="folds 1 block of 16 Conv1d to group=16 (GELU and SamePad "
        "follow the cat)")),
    Architecture("mixnet", MixNetBlock, (24, 16, 16), 23, Verdict(
        refusals=("would be slower",), depthwise=3, why="must not fold by default: 3x3/5x5/7x7 "
        "in one 7x7 is 1.8x the MACs (measured 1.7x slower); --mixconv always folds it")),
    Architecture("mixnet_dilated", lambda: MixNetBlock(dilated=True), (24, 16, 16), 24,
        Verdict(refusals=("would be slower",), depthwise=3, why="must not fold by default: "
        "dilations 1/2/3 in one 7x7 is 5.4x the MACs; --mixconv always folds it")),
    Architecture("mixnet_uneven", lambda: MixNetBlock(hidden=50), (24, 16, 16), 30, Verdict(
        refusals=("uneven split sizes",), depthwise=3, why="must not fold: timm splits 50 "
        "channels 18/16/16, and one grouped Conv needs equal groups")),
    Architecture("res2net", Res2NetBlock, (32, 16, 16), 25, Verdict(
        refusals=(f"{NOT_CONV}|{NOT_SPLIT}|also used",), why="must not fold: Res2Net branches "
        "depend on each other (K2 reads x2 + y1) and the last part passes unconvolved")),
    Architecture("shufflenet_v2", ShuffleNetV2, (32, 16, 16), 26, Verdict(
        refusals=(NOT_SPLIT,), depthwise=3, why="must not fold: stride 2 runs two branches on "
        "the same input (no split; a skip is expected); stride 1 passes one half through (one "
        "conv branch, not a candidate: no skip needed)")),
    Architecture("ghostnet", GhostBottleneck, (32, 16, 16), 27, Verdict(
        refusals=(f"{NOT_SPLIT}|also used by",) * 2, depthwise=2, why="must not fold: the "
        "cheap depthwise conv reads the primary conv's output, not a split of a common input")),
    Architecture("csp_c3", CSPBlock, (32, 16, 16), 28, Verdict(
        refusals=(NOT_SPLIT,), why="must not fold: path b is a bottleneck then a conv, not one "
        "conv of its split part (both paths end Conv+BN+SiLU, so the block is a candidate and "
        "the skip should say why)")),
    Architecture("inception", Inception, (16, 16, 16), 29, Verdict(
        refusals=(NOT_SPLIT, NOT_SPLIT), why="must not fold: parallel convs of the SAME tensor "
        "(no channel split), with different kernels")),
)  # fmt: skip
