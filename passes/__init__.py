"""Graph passes over onnx-ir models, one pass per module.

``PASSES`` maps the kebab-case names used on the command line and in reports to pass classes.
"""

from __future__ import annotations

from ._common import Rewrite, Skip
from ._fold_cost import MIXCONV_MODES, FoldCost
from ._geometry import ConvGeometry
from .expand_grouped_conv import ExpandGroupedConv
from .fold_slice_bounds import FoldSliceBounds
from .fold_split_conv_concat import FoldSplitConvConcat
from .lower_qoperator_to_qdq import LowerQOperatorToQDQ
from .resolve_conv_transpose_output_shape import ResolveConvTransposeOutputShape

__all__ = [
    "ConvGeometry",
    "ExpandGroupedConv",
    "FoldCost",
    "FoldSliceBounds",
    "FoldSplitConvConcat",
    "LowerQOperatorToQDQ",
    "MIXCONV_MODES",
    "PASSES",
    "ResolveConvTransposeOutputShape",
    "Rewrite",
    "Skip",
]

PASSES: dict[str, type] = {
    "fold-split-conv-concat": FoldSplitConvConcat,
    "fold-slice-bounds": FoldSliceBounds,
    "expand-grouped-conv": ExpandGroupedConv,
    "resolve-conv-transpose-output-shape": ResolveConvTransposeOutputShape,
    "lower-qoperator-to-qdq": LowerQOperatorToQDQ,
}
