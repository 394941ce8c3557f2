"""Whether a fold pays: the cost of a block before and after folding, in multiply-adds.

Most folds only remove work: N convolutions, a Split and a Concat become one convolution with
the same multiply-adds (MACs). Two kinds add some:

* **MixConv / mixed dilations**: every kernel is embedded in the largest grid, so the grouped
  conv does ``sum(C_i * K_grid) / sum(C_i * K_i)`` times the MACs (kernels 3/5/7: 1.8x;
  dilations 1/2/3 of a 3x3: 5.4x);
* **a branch output also used elsewhere**: that consumer then reads a Slice of the grouped
  output, one more node and a copy of the branch's output.

The estimate, per block, in MAC-equivalents (a target's :class:`FoldCost` prices a node launch
and an element copy in MACs)::

    branches = sum(MACs_i) + (N + 2) * launch + (in + out) * copy       # N convs, Split, Concat
    folded   = MACs_grid   + (1 + S) * launch + sum(out_s) * copy       # S Slices for extra uses

and the block folds when ``folded <= max_ratio * branches``. Sizes are the static ones of the
branches' outputs, with a symbolic batch taken as 1 (a larger batch only makes the MACs weigh
more). Without static spatial sizes a MixConv block is not folded (``mixconv="always"`` folds it
anyway); a block that adds no MACs always pays (fewer launches, fewer or equal copies).

Measured on onnxruntime's CPU EP (one thread, depthwise 3/5/7 and 3x3 dilations 1/2/3, from
48x16x16 to 96x56x56): the folded block ran 1.5-2.5x and 4.5-4.8x slower, i.e. at the MAC
ratio: launches cost a few microseconds, about 20,000 MACs of a depthwise conv there.
"""

from __future__ import annotations

import dataclasses
import math

from ._common import Refusal

MIXCONV_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class FoldCost:
    """A target's prices, in multiply-add equivalents, and the ratio a fold may cost.

    The defaults are onnxruntime's CPU EP and TVM's llvm target (measured, see above).
    """

    launch_macs: float = 20_000.0
    """Fixed cost of running one node (dispatch, setup, threads)."""
    copy_macs_per_element: float = 1.0
    """Cost of copying one element (what Split, Concat and Slice do)."""
    max_ratio: float = 1.0
    """Fold when the folded estimate is at most this times the branches' (1: not slower)."""


@dataclasses.dataclass
class Estimate:
    """The two costs of one block, and what they are made of, for the report."""

    branches: float
    folded: float
    mac_ratio: float
    slices: int
    max_ratio: float

    @property
    def ratio(self) -> float:
        return self.folded / self.branches if self.branches else math.inf

    @property
    def pays(self) -> bool:
        return self.folded <= self.max_ratio * self.branches

    def summary(self) -> str:
        return (
            f"{self.mac_ratio:.2f}x the multiply-adds, estimated {self.ratio:.2f}x the time of "
            f"the branches ({_mega(self.folded)} vs {_mega(self.branches)} MAC-equivalents"
            + (f", {self.slices} Slice(s) for outputs used elsewhere" if self.slices else "")
            + f"; folds up to {self.max_ratio:g}x)"
        )


def _mega(value: float) -> str:
    return f"{value / 1e6:.3g}M"


def estimate(
    branch_sizes: list[tuple[int, int, int, int]],
    grid_kernel: int,
    shared: list[int],
    cost: FoldCost,
) -> Estimate:
    """The costs of a block whose branch i has (in_elements, out_elements, in_per_group, K_i).

    Args:
        branch_sizes: Per branch: elements it reads, elements it writes, input channels per
            group, and its kernel's positions (product of the kernel shape).
        grid_kernel: Kernel positions of the folded conv (the largest grid for MixConv).
        shared: Indices of branches whose output is also used elsewhere.
        cost: The target's prices.
    """
    macs = sum(out * per_group * kernel for _, out, per_group, kernel in branch_sizes)
    grid = sum(out * per_group * grid_kernel for _, out, per_group, _ in branch_sizes)
    moved = sum(inp + out for inp, out, _, _ in branch_sizes)
    branches = macs + (len(branch_sizes) + 2) * cost.launch_macs
    branches += moved * cost.copy_macs_per_element
    sliced = sum(branch_sizes[i][1] for i in shared)
    folded = grid + (1 + len(shared)) * cost.launch_macs + sliced * cost.copy_macs_per_element
    mac_ratio = grid / macs if macs else 1.0
    return Estimate(branches, folded, mac_ratio, len(shared), cost.max_ratio)


def check_mode(mixconv: str | bool) -> str:
    """The mode ``mixconv`` names (True: "always", False: "never", as before modes existed)."""
    if mixconv is True:
        return "always"
    if mixconv is False:
        return "never"
    if mixconv not in MIXCONV_MODES:
        raise ValueError(f"mixconv must be one of {MIXCONV_MODES}, got {mixconv!r}")
    return mixconv


def refuse_unless_it_pays(found: Estimate | None, what: str) -> None:
    """Raise unless the estimate says the fold is not slower (``mixconv="auto"``)."""
    if found is None:
        raise Refusal(
            f"{what}: output sizes are not static, so its cost cannot be estimated "
            "(mixconv='always' folds it anyway)"
        )
    if not found.pays:
        raise Refusal(f"{what} would be slower: {found.summary()} (mixconv='always' folds it)")
