"""Safe while unknown, the second round: one rule for search and retrieval (docs/architecture.md,
"PACS profiles").

Until a node's profile is known, a setting the operator left out (``query_model``, ``retrieve``)
runs with its safe default, the standard's (Study Root, C-GET). A PACS that cannot serve that
default refuses the first request, and that request was the node's first contact: it started the
probe. So the caller waits for that probe (:meth:`gateway.profile.service.NodeProfiles.settled`)
and, when the profile chose another value for one of the settings that could explain the failure,
runs the request once more with the settled node. At most once: the settled node is effective (its
learned values are plain strings, configured as far as this rule can tell), so a second failure
stands. A node whose profile was already known, or whose settings are configured, never waits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from gateway.errors import DimseTimeout, GatewayError, ModelRefused, NodeUnreachable, PacsError
from gateway.settings import PacsNode, is_configured

Settled = Callable[[PacsNode], Awaitable[PacsNode]]
"""The node as its profile has it once the running probe (if any) has ended."""

QUERY: tuple[str, ...] = ("query_model",)
"""What may explain a refused C-FIND model."""
RETRIEVE: tuple[str, ...] = ("query_model", "retrieve")
"""What may explain a failed retrieval: the model of its C-FINDs, C-GETs and C-MOVEs, and C-GET
itself (refused; or its storage contexts cannot carry the stored syntax, where C-MOVE can)."""


def query_explained(error: BaseException) -> bool:
    """A C-FIND failure the query model may explain: the PACS refused the model."""
    return isinstance(error, ModelRefused)


def retrieval_explained(error: BaseException) -> bool:
    """A retrieval failure ``retrieve`` or ``query_model`` may explain: a refused model or C-GET, a
    failed status, sub-operations that did not deliver. Not a timeout or an unreachable node (the
    probe would fail the same way, and the client would wait for it for nothing)."""
    return isinstance(error, PacsError) and not isinstance(error, (DimseTimeout, NodeUnreachable))


async def relearned(node: PacsNode, settled: Settled | None, settings: Sequence[str]) -> PacsNode | None:
    """The node to ask once more, or None when the failure stands: ``settings`` are all configured
    (or learned already), nothing settles nodes, or the settled profile chose the same values."""
    open_settings = [s for s in settings if not is_configured(getattr(node, s))]
    if settled is None or not open_settings:
        return None
    again = await settled(node)
    if any(getattr(again, s) != getattr(node, s) for s in open_settings):
        return again
    return None


async def relearned_nodes(nodes: Sequence[PacsNode], failures: Sequence[object], settled: Settled | None,
                          settings: Sequence[str], explained: Callable[[BaseException], bool]
                          ) -> list[PacsNode] | None:
    """:func:`relearned` for each node whose result (``failures``, one per node: an exception or
    anything else) is a failure ``explained`` accepts; the nodes with the settled ones in place, or
    None when none changed."""
    changed, out = False, []
    for node, failure in zip(nodes, failures, strict=True):
        if isinstance(failure, BaseException) and explained(failure):
            again = await relearned(node, settled, settings)
            if again is not None:
                node, changed = again, True
        out.append(node)
    return out if changed else None


def failed_node(nodes: Sequence[PacsNode], error: GatewayError) -> list[object]:
    """One entry per node for :func:`relearned_nodes`: ``error`` for the node it names, None else."""
    return [error if error.node is not None and node.name == error.node else None for node in nodes]
