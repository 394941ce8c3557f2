"""gconv-compile: fold, expand, compile and verify grouped convolutions in ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "expand", "optimize"]


def optimize(model, *, target=None, check=True, seeds=(0, 1, 2), shapes=None):
    """Fold split-conv-concat blocks into grouped Convs; see :func:`gconv_compile.pipeline.optimize`."""
    from gconv_compile.pipeline import optimize as _optimize

    return _optimize(model, target=target, check=check, seeds=seeds, shapes=shapes)


def expand(
    model, *, mode=None, keep_depthwise=False, min_group=None, max_group=None, skip=(),
    target=None, check=True, seeds=(0, 1, 2), shapes=None,
):  # fmt: skip
    """Expand grouped Convs for targets without them; see :func:`gconv_compile.pipeline.expand`."""
    from gconv_compile.pipeline import expand as _expand

    return _expand(
        model, mode=mode, keep_depthwise=keep_depthwise, min_group=min_group,
        max_group=max_group, skip=skip, target=target, check=check, seeds=seeds, shapes=shapes,
    )  # fmt: skip


def compile(model, target="llvm", **options):  # noqa: A001 - the name users expect
    """Optimise and build a model with TVM; see :func:`gconv_compile.compile.compile`."""
    from gconv_compile.compile import compile as _compile

    return _compile(model, target, **options)
