"""Shared pytest fixtures: ``ort_equal``, the onnxruntime before/after comparison
(:mod:`ort_equal`) every rewrite test uses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `import builders` from any test module, however pytest was started.
sys.path.insert(0, str(Path(__file__).parent))

# Hypothesis profiles "ci" and "long" must exist before --hypothesis-profile is applied.
import hypothesis_profiles  # noqa: E402, F401
from ort_equal import assert_ort_equal  # noqa: E402


@pytest.fixture
def ort_equal():
    """``ort_equal(before_proto, after_model, **kw)``: see :func:`assert_ort_equal`."""
    return assert_ort_equal
