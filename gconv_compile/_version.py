"""The package version, in its own module so that every module can read it without importing
the package's ``__init__`` (which would put the package itself in the import graph)."""

__version__ = "0.1.0"
