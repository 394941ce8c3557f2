"""The loop every conv pass shares: walk the graph scopes, match anchors, rewrite, record.

A pass subclasses :class:`AnchoredPass` and provides ``_is_anchor(node)``, ``_match(node)``
(a match, None when the node is no candidate at all, or :class:`~._common.Refusal` with the
reason) and ``_rewrite(match, scope)`` (one record per rewritten block). The driver visits the
main graph, then its If/Loop/Scan bodies, then each model-local function and its bodies
(:func:`~._common.graph_scopes`), and offers every anchor node in graph order.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from ._common import NameScope, Refusal, Rewrite, Skip, graph_scopes, node_label

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Scope:
    """Where a rewrite happens: the graph, its label in reports, and how to add to it."""

    model: ir.Model
    graph: ir.Graph
    label: str
    names: NameScope
    in_function: bool
    """Inside a function body: constants must be Constant nodes, not initializers."""


@dataclasses.dataclass
class Match:
    """What ``_match`` found at one anchor node.

    ``refusals`` holds the parts of the anchor's block that matching gave up on while other
    parts matched (each becomes a Skip after the rewrite).
    """

    anchor: ir.Node
    refusals: list[Refusal] = dataclasses.field(default_factory=list, kw_only=True)


class AnchoredPass(ir.passes.InPlacePass):
    """Base of the conv passes: offers anchor nodes to ``_match`` and rewrites what matches.

    After a call, ``rewrites`` lists what was rewritten and ``skips`` the candidates left
    alone with the reason, in graph order.

    Args:
        subgraphs: Also rewrite inside If/Loop/Scan bodies.
        functions: Also rewrite inside model-local functions.
    """

    pass_name = ""

    def __init__(self, *, subgraphs: bool = True, functions: bool = True) -> None:
        super().__init__()
        self.subgraphs = subgraphs
        self.functions = functions
        self.rewrites: list[Rewrite] = []
        self.skips: list[Skip] = []

    # Hooks for subclasses ------------------------------------------------------------------

    def _begin(self, model: ir.Model) -> None:
        """Called once per call before any matching (reset per-call state here)."""

    def _is_anchor(self, node: ir.Node) -> bool:
        raise NotImplementedError

    def _match(self, node: ir.Node) -> Match | None:
        raise NotImplementedError

    def _rewrite(self, match: Match, scope: Scope) -> list[dict]:
        """Rewrite ``match``; return one ``{"summary": ..., "details": ...}`` per block."""
        raise NotImplementedError

    # The loop ------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = []
        self.skips = []
        self._begin(model)
        names = NameScope(model)
        for label, graph, in_function in graph_scopes(model):
            if in_function and not self.functions:
                continue
            if graph is not model.graph and not in_function and not self.subgraphs:
                continue
            scope = Scope(model, graph, label, names, in_function)
            for node in [n for n in graph if self._is_anchor(n)]:
                if node.graph is not graph:  # removed by an earlier rewrite
                    continue
                self._visit(node, scope)
        return ir.passes.PassResult(model, modified=bool(self.rewrites))

    def _visit(self, node: ir.Node, scope: Scope) -> None:
        anchor = node_label(node)
        try:
            match = self._match(node)
        except Refusal as refusal:
            self._skip(scope, anchor, refusal)
            return
        if match is None:
            return
        for record in self._rewrite(match, scope):
            self.rewrites.append(Rewrite(self.pass_name, scope.label, anchor, **record))
        for refusal in match.refusals:
            self._skip(scope, anchor, refusal)

    def _skip(self, scope: Scope, anchor: str, refusal: Refusal) -> None:
        self.skips.append(Skip(self.pass_name, scope.label, anchor, str(refusal)))
        logger.debug("skip %s: %s", anchor, refusal)
