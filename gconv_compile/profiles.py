"""Target profiles: what a deployment target runs, and how to rewrite a model for it.

A profile is a small JSON object. The built-in ones ship in ``gconv_compile/profiles/``; users
pass their own as a path to a ``.json`` file. Fields::

    {
      "name": "generic-npu",                     # optional in user files (default: file stem)
      "description": "one line for `gconv-compile profiles`",
      "supports_grouped_conv": false,            # Conv with 1 < group < C_in
      "supports_grouped_conv_transpose": false,  # ConvTranspose with group > 1
      "supports_depthwise": true,                # Conv with group == C_in
      "preferred_expansion": "split",            # "split" or "dense"
      "max_dense_flop_multiplier": 4,            # dense beyond this many x the work: split
      "fold": false,                             # fold split-conv-concat blocks first
      "fold_launch_macs": 20000,                 # optional: cost of one node, in multiply-adds
      "fold_copy_macs_per_element": 1,           # optional: cost of copying one element
      "fold_max_cost_ratio": 1                   # optional: fold when <= this x the branches
    }

The three optional ``fold_*`` fields price the cost estimate that decides whether a fold that
adds work (MixConv kernels embedded in one grid) pays on the target
(:mod:`gconv_compile.passes._fold_cost`); their defaults are onnxruntime's CPU EP, measured.

``optimize --target`` folds first when the profile says so, then expands every grouped
convolution the target cannot run (:meth:`Profile.expand_options`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from gconv_compile.errors import UserError
from gconv_compile.passes import FoldCost

EXPANSIONS = ("split", "dense")

_BOOL_FIELDS = (
    "supports_grouped_conv",
    "supports_grouped_conv_transpose",
    "supports_depthwise",
    "fold",
)
# Optional prices of the fold's cost estimate, with their defaults (see FoldCost).
_COST_FIELDS = {
    "fold_launch_macs": "launch_macs",
    "fold_copy_macs_per_element": "copy_macs_per_element",
    "fold_max_cost_ratio": "max_ratio",
}
_FIELDS = frozenset(
    {"name", "description", "preferred_expansion", "max_dense_flop_multiplier", *_BOOL_FIELDS,
     *_COST_FIELDS}
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a target runs natively and how the rest is rewritten for it."""

    name: str
    description: str
    supports_grouped_conv: bool
    supports_grouped_conv_transpose: bool
    supports_depthwise: bool
    preferred_expansion: str
    max_dense_flop_multiplier: float
    fold: bool
    source: str = "built-in"
    fold_cost: tuple[tuple[str, float], ...] = ()
    """The ``fold_*`` prices the profile sets, as (FoldCost field, value) pairs."""

    def fold_cost_model(self) -> FoldCost:
        """The prices of the fold's cost estimate on this target."""
        return FoldCost(**dict(self.fold_cost))

    def expand_options(self, mode: str | None = None) -> list[dict[str, Any]]:
        """Keyword arguments of the ``ExpandGroupedConv`` passes this target needs, in order.

        Args:
            mode: ``"split"`` or ``"dense"`` instead of the profile's preference.

        Returns:
            One dict per pass: Convs first (depthwise kept where the target has it), then
            ConvTransposes; empty when the target runs every grouped convolution.
        """
        common = {
            "mode": mode or self.preferred_expansion,
            "max_dense_multiplier": self.max_dense_flop_multiplier,
        }
        options = []
        if not self.supports_grouped_conv:
            options.append(
                {"op_types": ("Conv",), "keep_depthwise": self.supports_depthwise, **common}
            )
        if not self.supports_grouped_conv_transpose:
            options.append({"op_types": ("ConvTranspose",), "keep_depthwise": False, **common})
        return options

    def capabilities(self) -> str:
        """One line: what runs natively, how the rest is expanded, whether it folds."""

        def yes(flag: bool) -> str:
            return "yes" if flag else "no"

        return (
            f"grouped Conv: {yes(self.supports_grouped_conv)}, grouped ConvTranspose: "
            f"{yes(self.supports_grouped_conv_transpose)}, depthwise: "
            f"{yes(self.supports_depthwise)}; expand by {self.preferred_expansion} (dense up "
            f"to {self.max_dense_flop_multiplier:g}x work); fold: {yes(self.fold)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def builtin_names() -> list[str]:
    """Names of the profiles shipped with the package, sorted."""
    return sorted(entry.name[: -len(".json")] for entry in _builtin_dir().iterdir()
                  if entry.name.endswith(".json"))  # fmt: skip


def builtin_profiles() -> list[Profile]:
    return [load_profile(name) for name in builtin_names()]


def load_profile(target: str | os.PathLike | Profile) -> Profile:
    """A built-in profile by name, or a user profile from a JSON file path.

    A string that ends in ``.json`` or contains a path separator is read as a file; any other
    string names a built-in profile.

    Raises:
        UserError: Unknown name, unreadable file, or a profile with missing, unknown or
            ill-typed fields.
    """
    if isinstance(target, Profile):
        return target
    text = os.fspath(target)
    if _looks_like_path(text):
        path = Path(text)
        if not path.is_file():
            raise UserError(f"target profile '{text}': no such file")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"target profile '{text}': cannot read: {exc}")
        return parse_profile(raw, source=str(path), default_name=path.stem)
    if text not in builtin_names():
        raise UserError(
            f"unknown target profile '{text}'; built-in profiles are "
            f"{', '.join(builtin_names())}, or give a path to a .json profile"
        )
    raw = (_builtin_dir() / f"{text}.json").read_text(encoding="utf-8")
    return parse_profile(raw, source="built-in", default_name=text)


def parse_profile(raw: str, *, source: str, default_name: str) -> Profile:
    """Validate a profile's JSON text.

    Raises:
        UserError: Not JSON, not an object, or a missing, unknown or ill-typed field.
    """
    label = "target profile" if source == "built-in" else f"target profile '{source}'"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{label}: not valid JSON ({exc.msg} at line {exc.lineno})")
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise UserError(f"{label}: unknown field(s) {unknown}; known: {sorted(_FIELDS)}")
    missing = sorted(
        (set(_BOOL_FIELDS) | {"preferred_expansion", "max_dense_flop_multiplier"}) - set(data)
    )
    if missing:
        raise UserError(f"{label}: missing field(s) {missing}")
    for field in _BOOL_FIELDS:
        if not isinstance(data[field], bool):
            raise UserError(f"{label}: '{field}' must be true or false, got {data[field]!r}")
    if data["preferred_expansion"] not in EXPANSIONS:
        raise UserError(
            f"{label}: 'preferred_expansion' must be one of {list(EXPANSIONS)}, got "
            f"{data['preferred_expansion']!r}"
        )
    multiplier = data["max_dense_flop_multiplier"]
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or multiplier < 1:
        raise UserError(
            f"{label}: 'max_dense_flop_multiplier' must be a number >= 1, got {multiplier!r}"
        )
    fold_cost = {}
    for field, key in _COST_FIELDS.items():
        value = data.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"{label}: '{field}' must be a number >= 0, got {value!r}")
        fold_cost[key] = float(value)
    if fold_cost.get("max_ratio", 1.0) <= 0:
        raise UserError(f"{label}: 'fold_max_cost_ratio' must be above 0")
    name = data.get("name", default_name)
    description = data.get("description", "")
    for field, value in (("name", name), ("description", description)):
        if not isinstance(value, str) or (field == "name" and not value.strip()):
            raise UserError(f"{label}: '{field}' must be a non-empty string, got {value!r}")
    if data["supports_grouped_conv"] and not data["supports_depthwise"]:
        raise UserError(
            f"{label}: 'supports_grouped_conv' is true but 'supports_depthwise' is false; a "
            "depthwise conv is a grouped conv"
        )
    return Profile(
        name=name,
        description=description,
        supports_grouped_conv=data["supports_grouped_conv"],
        supports_grouped_conv_transpose=data["supports_grouped_conv_transpose"],
        supports_depthwise=data["supports_depthwise"],
        preferred_expansion=data["preferred_expansion"],
        max_dense_flop_multiplier=float(multiplier),
        fold=data["fold"],
        source=source,
        fold_cost=tuple(sorted(fold_cost.items())),
    )


def _looks_like_path(text: str) -> bool:
    return text.endswith(".json") or os.sep in text or "/" in text


def _builtin_dir():
    return resources.files("gconv_compile") / "profiles"
