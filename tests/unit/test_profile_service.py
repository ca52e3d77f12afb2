"""When profiles are taken, shared and published (gateway/profile/service.py), with the in-memory PACS
behind the Pacs interface and the in-process cache."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydicom.dataset import Dataset

from cache import keys
from cache.memory import MemoryCache
from gateway.errors import NodeUnreachable
from gateway.profile.decide import SAFE_QUIRKS
from gateway.profile.facts import PacsProfile
from gateway.profile.service import NodeProfiles
from gateway.settings import settings_from_dict
from tests.support.fake_pacs import FakePacs

pytestmark = pytest.mark.anyio
STUDY, SERIES = "1.2.3", "1.2.3.4"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(pacs: FakePacs, cache: MemoryCache | None = None, **profiling: object):
    settings = settings_from_dict({"nodes": [{"name": "a", "ae_title": "A", "host": "127.0.0.1", "port": 104}],
                                   "profiling": {"enabled": True, **profiling}})
    profiles = NodeProfiles(settings, pacs, cache or MemoryCache())
    published: list[tuple] = []
    profiles.on_change = published.append
    return settings, profiles, published


def a_pacs() -> FakePacs:
    pacs = FakePacs()
    pacs.add("a", STUDY, SERIES, "1.2.3.4.1")
    return pacs


async def test_first_contact_probes_in_the_background_and_publishes_the_effective_node():
    pacs = a_pacs()
    settings, profiles, published = make(pacs)
    watched = profiles.watching(pacs)
    assert profiles.state("a") == "unknown" and profiles.effective_nodes()[0].quirks == SAFE_QUIRKS
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    result = await watched.find(settings.nodes[0], ident)    # answered at once, with what is known
    assert [str(d.StudyInstanceUID) for d in result.datasets] == [STUDY]
    assert profiles.state("a") == "probing"
    await profiles.wait("a")
    assert profiles.state("a") == "probed" and pacs.calls["get"] == 1, "the probe retrieved one instance"
    assert published and published[-1][0].query_model == "study"
    # Learned, not the safe False: FakePacs finds a series by its UID alone (a relational query).
    assert published[-1][0].quirks.relational_queries is True
    await watched.find(settings.nodes[0], ident)
    await asyncio.sleep(0)
    # The probe's three associations (contexts, the idle hold, the untimed C-FIND), and no second probe.
    assert profiles.state("a") == "probed" and pacs.calls["associate_probe"] == 3, "no second probe"
    await profiles.close()


async def test_a_second_replica_adopts_the_shared_profile():
    pacs, cache = a_pacs(), MemoryCache()
    _, first, _ = make(pacs, cache)
    stored = await first.reprobe("a")
    assert stored is not None and await cache.get(keys.pacs_profile("a")) == stored.to_json()
    gets, associations = pacs.calls["get"], pacs.calls["associate_probe"]
    _, second, published = make(pacs, cache)
    second.touch("a")
    await second.wait("a")
    assert second.profile("a") == stored and pacs.calls["get"] == gets, "adopted, not probed again"
    assert published, "the adopted profile's effective node was published"
    # The first replica's probe read the PACS's identity just now: the second does not re-read it
    # (one association per replica at once was the frame storm's fourth association, tests/bench).
    second.touch("a")
    await second.wait("a")
    assert pacs.calls["associate_probe"] == associations, "no identity check right after adopting"
    await first.close()
    await second.close()


async def test_another_implementation_is_probed_again():
    pacs, cache = a_pacs(), MemoryCache()
    old = PacsProfile("a", probed_at=time.time(), implementation_class_uid="1.2.3.4.5",
                      implementation_version_name="FAKEPACS_0")
    await cache.set(keys.pacs_profile("a"), old.to_json(), 60)
    _, profiles, _ = make(pacs, cache, identity_check=0)
    profiles.touch("a")
    await profiles.wait("a")
    profile = profiles.profile("a")
    assert profile is not None and profile.identity == ("1.2.3.4.5", "FAKEPACS_1")
    assert profile.probed_at > old.probed_at and pacs.calls["get"] == 1


async def test_a_failed_probe_keeps_the_safe_defaults_and_waits_before_trying_again():
    pacs = a_pacs()
    pacs.down.add("a")
    _, profiles, published = make(pacs)
    profiles.touch("a")
    await profiles.wait("a")
    assert profiles.state("a") == "failed" and "NodeUnreachable" in (profiles.error("a") or "")
    assert profiles.effective_nodes()[0].quirks == SAFE_QUIRKS and not published
    calls = pacs.calls["associate_probe"]
    profiles.touch("a")
    await profiles.wait("a")
    assert pacs.calls["associate_probe"] == calls, "not retried at once"


async def test_disabled_profiling_probes_only_on_demand():
    pacs = a_pacs()
    _, profiles, _ = make(pacs, enabled=False)
    profiles.touch("a")
    assert profiles.state("a") == "unknown" and not pacs.calls["associate_probe"]
    assert await profiles.reprobe("a") is not None and profiles.state("a") == "probed"


async def test_a_failed_operation_schedules_an_implementation_check():
    pacs = a_pacs()
    settings, profiles, _ = make(pacs)
    await profiles.reprobe("a")
    watched = profiles.watching(pacs)
    pacs.down.add("a")
    with pytest.raises(NodeUnreachable):
        await watched.echo(settings.nodes[0])
    pacs.down.clear()
    calls = pacs.calls["associate_probe"]
    await watched.echo(settings.nodes[0])
    await profiles.wait("a")
    assert pacs.calls["associate_probe"] == calls + 1, "one association checked the implementation"
