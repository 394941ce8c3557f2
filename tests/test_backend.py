"""ONNX's own backend conformance cases, run through gconv_compile.backend (fold -> TVM llvm).

The node tests for Conv, ConvInteger, ConvTranspose, Split, Concat and Slice, and the
pytorch-converted Conv/ConvTranspose cases (groups, depthwise, dilated, 1-D/2-D/3-D). Cases
in ``KNOWN_FAILURES`` are skipped with their reason (``pytest -rs`` lists them);
``scripts/backend_conformance.py`` checks that list against a real run and writes
docs/backend_conformance.md.
"""

from __future__ import annotations

import re
import unittest
import warnings

import onnx.backend.test
import pytest

from gconv_compile.backend import CONFORMANCE_PATTERN, KNOWN_FAILURES, GconvBackend

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the node-case generators warn about overflowing casts
    _backend_test = onnx.backend.test.BackendTest(GconvBackend, __name__)

_PATTERN = re.compile(CONFORMANCE_PATTERN)
_SELECTED: list[str] = []

for _class_name, _case_class in _backend_test.test_cases.items():
    _methods = {}
    for _attr in dir(_case_class):
        if not _attr.endswith("_cpu") or not _PATTERN.search(_attr[: -len("_cpu")]):
            continue
        _name = _attr[: -len("_cpu")]
        _SELECTED.append(_name)
        _test = getattr(_case_class, _attr)
        if _name in KNOWN_FAILURES:
            _test = unittest.skip(KNOWN_FAILURES[_name])(_test)
        _methods[_attr] = _test
    if _methods:
        # Only our families: pytest would otherwise collect (and skip) ~3000 other cases.
        globals()[_class_name] = type(_class_name, (unittest.TestCase,), _methods)
# pytest collects every TestCase class bound at module level, loop variables included.
del _class_name, _case_class, _methods, _backend_test


@pytest.mark.parametrize(
    "family",
    ["test_conv_", "test_convtranspose", "test_split_", "test_concat_", "test_slice",
     "test_Conv2d_groups", "test_Conv2d_depthwise", "test_Conv2d_dilated", "test_Conv1d_groups",
     "test_Conv3d_groups"],
)  # fmt: skip
def test_selection_covers_the_family(family):
    assert any(name.startswith(family) for name in _SELECTED)


def test_every_known_failure_is_a_selected_case():
    assert set(KNOWN_FAILURES) <= set(_SELECTED)
    assert len(_SELECTED) - len(KNOWN_FAILURES) >= 70
