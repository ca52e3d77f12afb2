"""The PACS profile of every node: when it is taken, where it is kept, who sees its choices.

* **When** (``profiling`` settings): at first contact, i.e. the first DIMSE operation any service
  runs on the node (:class:`WatchedPacs` notices it), in the background: that request runs with
  what is known (a profile from the shared cache, or the safe defaults of
  :mod:`gateway.profile.decide`) and does not wait for the probe, unless the safe defaults failed
  on that PACS: then it waits for it once (:meth:`NodeProfiles.settled`,
  :mod:`gateway.profile.second_round`). Again after ``interval``; on demand
  (:meth:`NodeProfiles.reprobe`: the admin endpoint, the CLI); and when the PACS's Implementation
  Class UID or Version Name (PS3.7 D.3.3.2) differs from the profile's, checked with one
  association at most every ``identity_check`` seconds, and soon after an operation on the node
  failed (a PACS that was restarted, perhaps upgraded).
* **Where**: in memory, and in the cache (``cache.keys.pacs_profile``) for every replica, with a
  lease so that one replica probes while the others adopt its result.
* **Who sees it**: every change publishes the effective nodes (``on_change``); the app puts them
  into ``app.state.settings``, where the routes pick their nodes (``gateway.http.target_nodes``), so
  search, retrieval and STOW all see one node per name. ``/metrics`` gets info series.

Nothing here logs or stores patient data: profiles hold none (gateway/profile/facts.py), and log
lines name the node, the implementation and error classes only (docs/architecture.md, "PACS
profiles").
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from cache import keys
from cache.base import Cache
from gateway.errors import GatewayError, PacsError
from gateway.observability import Registry
from gateway.pacs import (
    AssociationFacts,
    FindResult,
    MoveDestination,
    OnInstance,
    Pacs,
    ProbeContext,
    QueryModel,
    RetrieveOutcome,
    RetrieveRequest,
    StoreItems,
    StoreResult,
)
from gateway.profile.decide import Resolution, resolve
from gateway.profile.facts import PacsProfile
from gateway.profile.probe import identity, probe_node
from gateway.profile.transfers import MoveProbe
from gateway.settings import PacsNode, Settings

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0
"""How long one replica may hold a node's probe before another may take it over."""
RETRY_AFTER_FAILURE = 60.0
"""A probe that could not reach the PACS is tried again at the next contact after this (or after
``identity_check`` when that is shorter)."""
SUSPECT_AFTER = 30.0
"""A failed operation schedules an implementation check at most this often per node."""

OnChange = Callable[[tuple[PacsNode, ...]], None]


class Operations(Protocol):
    """The operations of :class:`gateway.pacs.Pacs` the services run (a :class:`WatchedPacs` takes
    any implementation of them; its ``associate_probe`` is the profiles' own Pacs)."""

    async def echo(self, node: PacsNode) -> float: ...

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult: ...

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome: ...

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome: ...

    async def store(self, node: PacsNode, items: StoreItems, workdir: Path) -> list[StoreResult]: ...

    def query_associations_opened(self, node: PacsNode) -> int: ...

    async def close(self) -> None: ...


@dataclass
class _Node:
    configured: PacsNode
    resolution: Resolution
    profile: PacsProfile | None = None
    task: asyncio.Task[None] | None = None
    checked: float = float("-inf")       # monotonic time of the last cache read / implementation check
    retry_at: float = float("-inf")      # after a failed probe
    suspected: float = float("-inf")
    error: str | None = None             # the last failure, as an error class and the node's detail


class NodeProfiles:
    """Per node: the profile, the effective node, and when to probe (see the module docstring)."""

    def __init__(self, settings: Settings, pacs: Pacs, cache: Cache, *,
                 registry: Registry | None = None) -> None:
        self.settings = settings
        self.config = settings.profiling
        self._pacs = pacs
        self._cache = cache
        self._move: MoveProbe | None = None
        self._nodes = {n.name.lower(): _Node(n, resolve(n, None)) for n in settings.nodes}
        self.on_change: OnChange | None = None
        registry = registry or Registry()
        registry.gauge_callback("dwg_pacs_profile_info",
                                "1 per node: its PACS implementation and profile state",
                                ("node", "state", "implementation_class_uid", "implementation_version_name"),
                                self._info_samples)
        registry.gauge_callback("dwg_pacs_behaviour_info",
                                "1 per node and setting: the behaviour in effect and where it comes from "
                                "(configured, learned, safe default)", ("node", "setting", "value", "source"),
                                self._behaviour_samples)
        registry.gauge_callback("dwg_pacs_profile_age_seconds", "seconds since the node's PACS was profiled",
                                ("node",), self._age_samples)

    # ------------------------------------------------------------------ views

    def _node(self, name: str) -> _Node | None:
        return self._nodes.get(name.lower())

    def effective(self, node: PacsNode) -> PacsNode:
        """The node every service should use for ``node`` (looked up by name)."""
        known = self._node(node.name)
        return known.resolution.node if known is not None else resolve(node, None).node

    async def settled(self, node: PacsNode) -> PacsNode:
        """The effective node once the node's running probe (if any) has ended."""
        await self.wait(node.name)
        return self.effective(node)

    def effective_nodes(self) -> tuple[PacsNode, ...]:
        """Every configured node, effective, in config order."""
        return tuple(state.resolution.node for state in self._nodes.values())

    def resolution(self, name: str) -> Resolution | None:
        known = self._node(name)
        return known.resolution if known is not None else None

    def profile(self, name: str) -> PacsProfile | None:
        known = self._node(name)
        return known.profile if known is not None else None

    def state(self, name: str) -> str:
        """``probing``, ``probed``, ``failed`` (no profile: the last probe failed) or ``unknown``."""
        known = self._node(name)
        if known is None:
            return "unknown"
        if known.task is not None and not known.task.done():
            return "probing"
        if known.profile is not None:
            return "probed"
        return "failed" if known.error else "unknown"

    def error(self, name: str) -> str | None:
        known = self._node(name)
        return known.error if known is not None else None

    # ------------------------------------------------------------------ wiring

    def attach_move_destination(self, probe: MoveProbe) -> None:
        """The storage SCP runs: C-MOVE can be probed, and chosen."""
        self._move = probe
        for state in self._nodes.values():
            state.resolution = resolve(state.configured, state.profile, move_available=True)
        self._publish()

    def watching(self, pacs: Operations) -> WatchedPacs:
        """``pacs`` as the services should use it: every operation is a contact (see module docstring)."""
        return WatchedPacs(pacs, self)

    async def associate_probe(self, node: PacsNode, contexts: Sequence[ProbeContext], *,
                              scp_roles: Sequence[str] = (),
                              timed_find: tuple[str, Dataset] | None = None,
                              hold_idle: float = 0.0) -> AssociationFacts:
        return await self._pacs.associate_probe(node, contexts, scp_roles=scp_roles, timed_find=timed_find,
                                                hold_idle=hold_idle)

    # ------------------------------------------------------------------ triggers

    def touch(self, name: str) -> None:
        """A DIMSE operation is about to run on the node: start what is due, in the background."""
        state = self._node(name)
        if state is None or not self.config.enabled:
            return
        if state.task is not None and not state.task.done():
            return
        now = time.monotonic()
        if now < state.retry_at:
            return
        stale = state.profile is None or time.time() - state.profile.probed_at >= self.config.interval
        if stale or now - state.checked >= self.config.identity_check:
            state.task = self._start(state, force=False)

    def suspect(self, name: str) -> None:
        """An operation on the node failed: check its implementation at the next contact."""
        state = self._node(name)
        if state is None:
            return
        now = time.monotonic()
        if now - state.suspected >= SUSPECT_AFTER:
            state.suspected = now
            state.checked = float("-inf")
            state.retry_at = float("-inf")

    async def reprobe(self, name: str) -> PacsProfile | None:
        """Probe the node now (on demand) and return its profile (None when the probe failed)."""
        state = self._node(name)
        if state is None:
            return None
        if state.task is not None and not state.task.done():
            await asyncio.shield(state.task)
        state.task = self._start(state, force=True)
        await asyncio.shield(state.task)
        return state.profile

    async def wait(self, name: str) -> None:
        """Until a probe of the node that is running now has ended (tests, the CLI)."""
        state = self._node(name)
        if state is not None and state.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(state.task)

    async def close(self) -> None:
        tasks = [s.task for s in self._nodes.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # ------------------------------------------------------------------ work

    def _start(self, state: _Node, *, force: bool) -> asyncio.Task[None]:
        """The probe as a task of its own, in an empty context: it belongs to no request, so its DIMSE
        operations are not spans of the request that happened to be the first contact, nor its log
        lines that request's (the request id and trace context are context variables,
        docs/architecture.md "App")."""
        return asyncio.get_running_loop().create_task(self._refresh(state, force=force),
                                                      name=f"profile {state.configured.name}",
                                                      context=contextvars.Context())

    async def _refresh(self, state: _Node, *, force: bool) -> None:
        node = state.configured
        try:
            if not force and not await self._due_after_cache(state):
                return
            await self._probe(state, force=force)
            state.error = None
        except GatewayError as exc:
            state.error = f"{type(exc).__name__}: {exc.detail}"
            state.retry_at = time.monotonic() + min(RETRY_AFTER_FAILURE, self.config.identity_check)
            log.warning("profiling node %s failed: %s", node.name, type(exc).__name__)
        except asyncio.CancelledError:
            raise
        except Exception:
            state.error = "InternalError: the probe failed"
            state.retry_at = time.monotonic() + RETRY_AFTER_FAILURE
            log.exception("profiling node %s failed", node.name)

    async def _due_after_cache(self, state: _Node) -> bool:
        """Adopt a newer profile from the cache; True when a probe is still due (stale, or the PACS
        now answers with another implementation)."""
        node = state.configured
        data = await self._cache.get(keys.pacs_profile(node.name))
        stored = PacsProfile.from_json(data) if data is not None else None
        now = time.monotonic()
        if stored is not None and (state.profile is None or stored.probed_at > state.profile.probed_at):
            self._adopt(state, stored)
            # Another replica's probe read the PACS's identity when it ran: that counts as this
            # replica's check, or every replica would open an association to re-read it at once.
            state.checked = max(state.checked, now - max(0.0, time.time() - stored.probed_at))
        if state.profile is None or time.time() - state.profile.probed_at >= self.config.interval:
            return True
        if now - state.checked < self.config.identity_check:
            return False
        state.checked = now
        current = await identity(self._pacs, node)
        if current == state.profile.identity:
            return False
        log.info("node %s now answers as %s %s (profiled as %s %s): probing again", node.name, *current,
                 *state.profile.identity)
        return True

    async def _probe(self, state: _Node, *, force: bool) -> None:
        node = state.configured
        lease, token = keys.pacs_profile(node.name, lease=True), secrets.token_hex(8).encode()
        if not await self._cache.set_nx(lease, token, LEASE_SECONDS) and not force:
            state.checked = time.monotonic()   # another replica probes: its result is read next time
            return
        try:
            log.info("profiling node %s", node.name)
            profile = await probe_node(self._pacs, node, move=self._move)
        finally:
            await self._cache.delete_if(lease, token)
        state.checked = time.monotonic()
        self._adopt(state, profile)
        await self._cache.set(keys.pacs_profile(node.name), profile.to_json(),
                              max(2 * self.config.interval, 60.0))

    def _adopt(self, state: _Node, profile: PacsProfile) -> None:
        state.profile = profile
        before = state.resolution.node
        state.resolution = resolve(state.configured, profile, move_available=self._move is not None)
        if state.resolution.node != before:
            self._publish()

    def _publish(self) -> None:
        if self.on_change is not None:
            self.on_change(self.effective_nodes())

    # ------------------------------------------------------------------ /metrics

    def _info_samples(self) -> list[tuple[tuple[str, ...], float]]:
        out: list[tuple[tuple[str, ...], float]] = []
        for state in self._nodes.values():
            name = state.configured.name
            uid, version = state.profile.identity if state.profile is not None else ("", "")
            out.append(((name, self.state(name), uid, version), 1.0))
        return out

    def _behaviour_samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [((state.configured.name, c.setting, str(c.value).lower(), c.source), 1.0)
                for state in self._nodes.values() for c in state.resolution.choices]

    def _age_samples(self) -> list[tuple[tuple[str, ...], float]]:
        now = time.time()
        return [((s.configured.name,), round(now - s.profile.probed_at, 1))
                for s in self._nodes.values() if s.profile is not None]


class WatchedPacs:
    """A :class:`gateway.pacs.Pacs` that tells :class:`NodeProfiles` about every operation (first
    contact, failures) and otherwise only delegates."""

    def __init__(self, inner: Operations, profiles: NodeProfiles) -> None:
        self.inner = inner
        self.profiles = profiles

    def _contact(self, node: PacsNode) -> None:
        self.profiles.touch(node.name)

    def _failed(self, node: PacsNode, exc: BaseException) -> None:
        if isinstance(exc, PacsError):
            self.profiles.suspect(node.name)

    async def echo(self, node: PacsNode) -> float:
        self._contact(node)
        try:
            return await self.inner.echo(node)
        except PacsError as exc:
            self._failed(node, exc)
            raise

    async def find(self, node: PacsNode, identifier: Dataset, *, model: QueryModel | None = None,
                   max_results: int | None = None) -> FindResult:
        self._contact(node)
        try:
            return await self.inner.find(node, identifier, model=model, max_results=max_results)
        except PacsError as exc:
            self._failed(node, exc)
            raise

    async def get(self, node: PacsNode, request: RetrieveRequest, on_instance: OnInstance,
                  cancel: threading.Event) -> RetrieveOutcome:
        self._contact(node)
        try:
            return await self.inner.get(node, request, on_instance, cancel)
        except PacsError as exc:
            self._failed(node, exc)
            raise

    async def move(self, node: PacsNode, request: RetrieveRequest, *, destination: str, msg_id: int,
                   cancel: threading.Event) -> RetrieveOutcome:
        self._contact(node)
        try:
            return await self.inner.move(node, request, destination=destination, msg_id=msg_id, cancel=cancel)
        except PacsError as exc:
            self._failed(node, exc)
            raise

    async def store(self, node: PacsNode, items: StoreItems, workdir: Path) -> list[StoreResult]:
        self._contact(node)
        try:
            return await self.inner.store(node, items, workdir)
        except PacsError as exc:
            self._failed(node, exc)
            raise

    def query_associations_opened(self, node: PacsNode) -> int:
        return self.inner.query_associations_opened(node)

    async def associate_probe(self, node: PacsNode, contexts: Sequence[ProbeContext], *,
                              scp_roles: Sequence[str] = (),
                              timed_find: tuple[str, Dataset] | None = None,
                              hold_idle: float = 0.0) -> AssociationFacts:
        return await self.profiles.associate_probe(node, contexts, scp_roles=scp_roles,
                                                   timed_find=timed_find, hold_idle=hold_idle)

    async def close(self) -> None:
        await self.inner.close()


def move_probe(destination: MoveDestination, ae_title: str, cache: Cache) -> MoveProbe:
    """The C-MOVE destination for probes, with Message IDs from the shared counter (as retrievals
    take them, docs/architecture.md, "C-MOVE"), skipping ones pending here."""
    async def next_msg_id() -> int:
        for _ in range(65535):
            msg_id = await cache.next_counter(keys.MOVE_MESSAGE_IDS, 65535)
            if not destination.is_pending(msg_id):
                return msg_id
        raise PacsError("65535 C-MOVEs pending")

    return MoveProbe(destination, ae_title, next_msg_id)
