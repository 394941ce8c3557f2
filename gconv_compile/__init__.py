"""gconv-compile: fold, expand, compile and verify grouped convolutions in ONNX models.

The Python API is :func:`optimize`, :func:`expand`, :func:`compile` and :func:`load`; the passes themselves are
``gconv_compile.passes`` (source folder ``passes/``). Where each step lives:

- ``model_io``: load and validate, save atomically; ``files``: the one atomic file writer.
- ``targets``: target specs and which passes a target gets (no TVM); ``profiles``: the targets'
  JSON profiles.
- ``pipeline``: ``optimize``/``expand`` and :func:`~gconv_compile.pipeline.run_checked`, the
  check every rewrite goes through; ``reference`` runs onnxruntime, ``compare`` compares.
- ``build``: TVM Relax import, build, export; ``library``: the sidecar, loading and running a
  library; ``tvm_schedules``: our TVM schedules and tuning.
- ``verify``: the ``verify`` command (a TVM build against onnxruntime); ``report``: what a
  command did; ``explain``: the ``explain`` command; ``cli``: the command line.

See docs/architecture.md for the data flow.
"""

from __future__ import annotations

from gconv_compile._version import __version__

__all__ = ["__version__", "compile", "expand", "load", "optimize"]

# The functions import their modules when called: `import gconv_compile` (which every
# `import gconv_compile.x` runs first) then loads no onnx, onnxruntime or TVM.


def optimize(model, *, target=None, check=True, seeds=(0, 1, 2), shapes=None, mixconv="auto"):
    """Fold split-conv-concat blocks into grouped Convs; see :func:`gconv_compile.pipeline.optimize`."""
    from gconv_compile.pipeline import optimize as _optimize

    return _optimize(model, target=target, check=check, seeds=seeds, shapes=shapes, mixconv=mixconv)


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
    """Optimise and build a model with TVM; see :func:`gconv_compile.build.compile`."""
    from gconv_compile.build import compile as _compile

    return _compile(model, target, **options)


def load(path, *, threads=None):
    """Load a compiled library with TVM's runtime alone; see :func:`gconv_compile.runtime.load`."""
    from gconv_compile.runtime import load as _load

    return _load(path, threads=threads)
