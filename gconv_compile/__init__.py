"""gconv-compile: fold, expand, compile and verify grouped convolutions in ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "optimize"]


def optimize(model, *, check=True, seeds=(0, 1, 2), shapes=None):
    """Fold split-conv-concat blocks into grouped Convs; see :func:`gconv_compile.pipeline.optimize`."""
    from gconv_compile.pipeline import optimize as _optimize

    return _optimize(model, check=check, seeds=seeds, shapes=shapes)
