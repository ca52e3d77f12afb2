"""The Cache contract, run against both implementations, plus what only Redis can do wrong.

Every contract test runs twice: against :class:`MemoryCache` and against :class:`RedisCache` on a real
Redis (the ``redis_url`` fixture), each with a random prefix whose keys are deleted afterwards. The
Redis-only tests cover degradation (nothing listening, a server that never answers, a server killed
and restarted mid-test), values of the wrong type, and cancelled callers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from cache.base import Cache
from cache.memory import MemoryCache
from cache.redis import RedisCache
from gateway.app import make_cache
from gateway.settings import settings_from_dict

from .peers import free_port, redis_ping

pytestmark = pytest.mark.integration

# Degradation tests: every call must answer within TIMEOUT * 2. Tests of the working path use a
# generous timeout instead, so a loaded CI machine cannot turn them into degradation tests.
TIMEOUT = 0.3
HEALTHY_TIMEOUT = 1.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


class Backend:
    """Makes caches of one implementation; remembers every prefix so the keys can be removed."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.prefixes: list[str] = []

    def new_prefix(self) -> str:
        prefix = f"test:{secrets.token_hex(6)}:"
        self.prefixes.append(prefix)
        return prefix

    def make(self, prefix: str | None = None) -> Cache:
        prefix = prefix or self.new_prefix()
        if self.redis_url is None:
            return MemoryCache(prefix=prefix)
        return RedisCache(self.redis_url, prefix=prefix, timeout=HEALTHY_TIMEOUT)

    @asynccontextmanager
    async def open(self, prefix: str | None = None) -> AsyncIterator[Cache]:
        cache = self.make(prefix)
        try:
            yield cache
        finally:
            await cache.close()

    def cleanup(self) -> None:
        if self.redis_url is None:
            return
        with redis.Redis.from_url(self.redis_url, protocol=2) as client:
            for prefix in self.prefixes:
                keys = list(client.scan_iter(match=prefix + "*", count=1000))
                if keys:
                    client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    b = Backend(request.param, url)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, protocol=2) as client:
        yield client


# ---------------------------------------------------------------------------- the contract


def test_values_expire_and_delete(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            assert await c.get("missing") is None
            await c.set("a", b"\x00binary\xff", 5)
            assert await c.get("a") == b"\x00binary\xff"
            await c.set("a", b"two", 5)
            assert await c.get("a") == b"two"
            await c.delete("a", "never-there")
            assert await c.get("a") is None
            await c.set("short", b"x", 0.15)
            assert await c.get("short") == b"x"
            await asyncio.sleep(0.3)
            assert await c.get("short") is None
            await c.set("zero", b"x", 0)      # no TTL, no entry
            assert await c.get("zero") is None
    run(scenario())


def test_counters(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            assert await c.get_int("gen:n1") == 0
            assert [await c.incr("gen:n1") for _ in range(3)] == [1, 2, 3]
            assert await c.get_int("gen:n1") == 3
            assert await c.get_int("gen:n2") == 0
            await c.delete("gen:n1")
            assert await c.get_int("gen:n1") == 0
            assert await c.incr("gen:n1") == 1
    run(scenario())


def test_sets_rearm_their_ttl(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            assert await c.smembers("loc:study:1.2") == set()
            await c.sadd("loc:study:1.2", ["orthanc", "dcm"], 0.4)
            await c.sadd("loc:study:1.2", ["orthanc", "third"], 0.4)
            assert await c.smembers("loc:study:1.2") == {"orthanc", "dcm", "third"}
            await asyncio.sleep(0.25)
            await c.sadd("loc:study:1.2", [], 0.4)          # re-arms without adding
            await asyncio.sleep(0.25)
            assert await c.smembers("loc:study:1.2") == {"orthanc", "dcm", "third"}
            await asyncio.sleep(0.3)
            assert await c.smembers("loc:study:1.2") == set()
    run(scenario())


def test_lease_acquire_extend_release(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            lease = "lease:series:1.2.3"
            assert await c.set_nx(lease, b"replica-a", 0.3)
            assert not await c.set_nx(lease, b"replica-b", 0.3)
            assert not await c.extend_if(lease, b"replica-b", 5)
            await asyncio.sleep(0.2)
            assert await c.extend_if(lease, b"replica-a", 0.6)
            await asyncio.sleep(0.2)                        # past the first TTL: the extension held
            assert await c.get(lease) == b"replica-a"
            assert not await c.delete_if(lease, b"replica-b")
            assert await c.get(lease) == b"replica-a"
            assert await c.delete_if(lease, b"replica-a")
            assert await c.get(lease) is None
            assert not await c.delete_if(lease, b"replica-a")
            # A holder that dies stops extending: the lease expires and someone else takes it.
            assert await c.set_nx(lease, b"replica-b", 0.15)
            await asyncio.sleep(0.3)
            assert not await c.extend_if(lease, b"replica-b", 5)
            assert await c.set_nx(lease, b"replica-c", 5)
            assert not await c.set_nx("other", b"x", 0)     # a lease needs a TTL
    run(scenario())


def test_stream_replay_from_zero_and_from_an_id(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            s = "arrivals:r1"
            assert await c.xread_from(s, b"0", 0) == []
            for i in range(3):
                await c.xadd(s, {b"sop": b"1.2.%d" % i, b"replica": b"a"}, 5)
            entries = await c.xread_from(s, b"0", 0)
            assert [f for _, f in entries] == [{b"sop": b"1.2.%d" % i, b"replica": b"a"} for i in range(3)]
            ids = [i for i, _ in entries]
            assert len(set(ids)) == 3
            assert [tuple(map(int, i.split(b"-"))) for i in ids] == sorted(
                tuple(map(int, i.split(b"-"))) for i in ids)
            assert await c.xread_from(s, ids[1], 0) == entries[2:]
            assert await c.xread_from(s, ids[2], 0) == []
            assert await c.xread_from(s, b"not-an-id", 0) == []
            # MAXLEN keeps the newest entries.
            for i in range(5):
                await c.xadd("arrivals:r2", {b"n": b"%d" % i}, 5, maxlen=3)
            assert [f[b"n"] for _, f in await c.xread_from("arrivals:r2", b"0", 0)] == [b"2", b"3", b"4"]
            # A stream expires like everything else.
            await c.xadd("arrivals:r3", {b"n": b"1"}, 0.15)
            await asyncio.sleep(0.3)
            assert await c.xread_from("arrivals:r3", b"0", 0) == []
    run(scenario())


def test_stream_blocking_read_gets_later_entries(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            s = "arrivals:r1"
            await c.xadd(s, {b"n": b"1"}, 5)
            (first_id, _), = await c.xread_from(s, b"0", 0)
            reader = asyncio.create_task(c.xread_from(s, first_id, 5000))
            late = asyncio.create_task(c.xread_from(s, b"$", 5000))
            await asyncio.sleep(0.2)
            assert not reader.done() and not late.done()
            started = time.monotonic()
            await c.xadd(s, {b"n": b"2"}, 5)
            got, got_late = await asyncio.wait_for(asyncio.gather(reader, late), 2)
            assert time.monotonic() - started < 1.0
            assert [f for _, f in got] == [{b"n": b"2"}]
            assert got_late == got
            # Nothing arrives: an empty answer after about block_ms.
            started = time.monotonic()
            assert await c.xread_from(s, got[0][0], 300) == []
            assert 0.25 <= time.monotonic() - started < 1.5
    run(scenario())


def test_next_counter_wraps_at_modulo(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            assert [await c.next_counter("move:msgid", 3) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1]
            assert await c.next_counter("move:other", 65535) == 1
            with pytest.raises(ValueError):
                await c.next_counter("move:msgid", 0)
    run(scenario())


def test_prefixes_isolate(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as a, backend.open() as b:
            await a.set("k", b"from-a", 5)
            await a.incr("gen:n")
            await a.sadd("set", ["a"], 5)
            await a.xadd("stream", {b"n": b"a"}, 5)
            assert await a.set_nx("lease", b"a", 5)
            assert await b.get("k") is None
            assert await b.get_int("gen:n") == 0
            assert await b.smembers("set") == set()
            assert await b.xread_from("stream", b"0", 0) == []
            assert await b.set_nx("lease", b"b", 5)
            await b.delete("k")
            assert await a.get("k") == b"from-a"
    run(scenario())


def test_a_value_of_another_kind_is_a_miss(backend: Backend) -> None:
    async def scenario() -> None:
        async with backend.open() as c:
            await c.sadd("a-set", ["m"], 5)
            await c.set("a-string", b"v", 5)
            assert await c.get("a-set") is None
            assert await c.smembers("a-string") == set()
            assert await c.xread_from("a-set", b"0", 0) == []
            assert await c.xread_from("a-set", b"0", 100) == []
            assert not await c.extend_if("a-set", b"m", 5)
            assert not await c.delete_if("a-set", b"m")
            assert not await c.set_nx("a-set", b"m", 5)
            await c.xadd("a-string", {b"n": b"1"}, 5)        # refused, the value stays
            await c.sadd("a-string", ["x"], 5)
            assert await c.get("a-string") == b"v"
            assert await c.smembers("a-set") == {"m"}
    run(scenario())


# ---------------------------------------------------------------------------- Redis only


def test_make_cache_builds_redis_from_settings(redis_url: str) -> None:
    settings = settings_from_dict({"cache": {"url": redis_url, "prefix": "t:", "timeout": 0.5}})
    cache = make_cache(settings)
    assert isinstance(cache, RedisCache)
    run(cache.close())
    assert isinstance(make_cache(settings_from_dict({})), MemoryCache)


def test_redis_keys_carry_prefix_and_ttl(redis_url: str, raw_redis: redis.Redis) -> None:
    prefix = f"test:{secrets.token_hex(6)}:"

    async def scenario() -> None:
        c = RedisCache(redis_url, prefix=prefix, timeout=HEALTHY_TIMEOUT)
        try:
            await c.set("v", b"1", 60)
            await c.sadd("s", ["a"], 60)
            await c.xadd("x", {b"a": b"b"}, 60)
            assert await c.set_nx("l", b"t", 60)
            assert await c.extend_if("l", b"t", 120)
            await c.incr("n")
            await c.next_counter("m", 10)
        finally:
            await c.close()

    try:
        run(scenario())
        keys = {k.decode() for k in raw_redis.scan_iter(match=prefix + "*")}
        assert keys == {prefix + k for k in ("v", "s", "x", "l", "n", "m")}
        for k in ("v", "s", "x"):
            assert 0 < raw_redis.pttl(prefix + k) <= 60_000
        assert 60_000 < raw_redis.pttl(prefix + "l") <= 120_000
        assert raw_redis.pttl(prefix + "n") == -1 and raw_redis.pttl(prefix + "m") == -1  # counters
    finally:
        leftover = list(raw_redis.scan_iter(match=prefix + "*"))
        if leftover:
            raw_redis.delete(*leftover)


def test_redis_foreign_values_are_misses(redis_url: str, raw_redis: redis.Redis,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cache.redis")
    prefix = f"test:{secrets.token_hex(6)}:"
    raw_redis.rpush(prefix + "list", b"a", b"b")
    raw_redis.set(prefix + "text", b"not a number")
    raw_redis.sadd(prefix + "set", b"ok", b"\xff\xfe")
    raw_redis.hset(prefix + "hash", b"f", b"v")

    async def scenario() -> None:
        c = RedisCache(redis_url, prefix=prefix, timeout=HEALTHY_TIMEOUT)
        try:
            assert await c.get("list") is None
            assert await c.get("hash") is None
            assert await c.smembers("text") == set()
            assert await c.smembers("set") == {"ok"}
            assert await c.get_int("text") == 0
            assert await c.get_int("list") == 0
            assert await c.incr("text") == -1
            assert 1 <= await c.next_counter("list", 10) <= 10
            assert await c.xread_from("list", b"0", 0) == []
            assert await c.xread_from("hash", b"0", 200) == []
            assert not await c.extend_if("list", b"a", 5)
            assert not await c.delete_if("hash", b"v")
            await c.xadd("text", {b"a": b"b"}, 5)
            await c.sadd("text", ["x"], 5)
            assert await c.ping()
            assert c.failures == 0 and not c.degraded
            assert c.foreign_values >= 10
        finally:
            await c.close()

    try:
        run(scenario())
        assert raw_redis.get(prefix + "text") == b"not a number"
        assert raw_redis.lrange(prefix + "list", 0, -1) == [b"a", b"b"]
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "wrong kind" in warnings[0].getMessage()
    finally:
        leftover = list(raw_redis.scan_iter(match=prefix + "*"))
        if leftover:
            raw_redis.delete(*leftover)


async def assert_every_call_degrades(c: RedisCache) -> None:
    """Each call answers its miss value within TIMEOUT * 2, whatever state Redis is in."""
    calls: list[tuple[str, Callable[[], Coroutine[Any, Any, Any]], Any]] = [
        ("get", lambda: c.get("k"), None),
        ("set", lambda: c.set("k", b"v", 5), None),
        ("delete", lambda: c.delete("k"), None),
        ("incr", lambda: c.incr("n"), -1),
        ("get_int", lambda: c.get_int("n"), 0),
        ("sadd", lambda: c.sadd("s", ["a"], 5), None),
        ("smembers", lambda: c.smembers("s"), set()),
        ("set_nx", lambda: c.set_nx("l", b"t", 5), True),
        ("extend_if", lambda: c.extend_if("l", b"t", 5), True),
        ("delete_if", lambda: c.delete_if("l", b"t"), False),
        ("xadd", lambda: c.xadd("x", {b"a": b"b"}, 5), None),
        ("xread_from", lambda: c.xread_from("x", b"0", 0), []),
        ("xread_from blocking", lambda: c.xread_from("x", b"0", 50), []),
        ("ping", lambda: c.ping(), False),
    ]
    for name, call, miss in calls:
        started = time.monotonic()
        assert await call() == miss, name
        assert time.monotonic() - started < TIMEOUT * 2, name
    started = time.monotonic()
    assert 1 <= await c.next_counter("m", 65535) <= 65535
    assert time.monotonic() - started < TIMEOUT * 2


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "cache.redis" and r.levelno == logging.WARNING and "unavailable" in r.getMessage()]


def recoveries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "cache.redis" and r.levelno == logging.INFO and "is back" in r.getMessage()]


@pytest.mark.parametrize("retry_interval", [0.0, 1.0], ids=["every-call-tries", "breaker-open"])
def test_redis_down_nothing_listening(caplog: pytest.LogCaptureFixture, retry_interval: float) -> None:
    caplog.set_level(logging.INFO, logger="cache.redis")

    async def scenario() -> None:
        c = RedisCache(f"redis://127.0.0.1:{free_port()}/0", prefix="t:", timeout=TIMEOUT,
                       retry_interval=retry_interval)
        try:
            for _ in range(3):
                await assert_every_call_degrades(c)
            assert c.failures >= 3 * 14 and c.degraded
        finally:
            await c.close()

    run(scenario())
    assert len(outage_warnings(caplog)) == 1
    assert recoveries(caplog) == []


def test_redis_that_never_answers(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that accepts connections and never replies (a hung or overloaded Redis)."""
    caplog.set_level(logging.INFO, logger="cache.redis")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(64)         # the kernel completes handshakes; nobody ever reads or writes
        port = mute.getsockname()[1]

        async def scenario() -> None:
            c = RedisCache(f"redis://127.0.0.1:{port}/0", prefix="t:", timeout=TIMEOUT, retry_interval=0)
            try:
                await assert_every_call_degrades(c)
                assert c.degraded
            finally:
                await c.close()

        run(scenario())
    assert len(outage_warnings(caplog)) == 1


class RedisServer:
    """A private redis-server on a fixed port that a test can kill and start again."""

    def __init__(self, workdir: Path) -> None:
        executable = shutil.which("redis-server")
        assert executable, "redis-server not on PATH (scripts/install-test-deps.sh installs it)"
        self.executable = executable
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + 10
        while not redis_ping("127.0.0.1", self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


def test_redis_killed_and_restarted(private_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cache.redis")

    async def scenario() -> None:
        c = RedisCache(private_redis.url, prefix="t:", timeout=TIMEOUT, retry_interval=0.2)
        try:
            await c.set("k", b"v", 30)
            await c.sadd("s", ["a"], 30)
            assert await c.get("k") == b"v" and await c.ping()

            private_redis.kill()          # mid-test: the pool holds connections to a dead server
            for _ in range(3):
                await assert_every_call_degrades(c)
                await asyncio.sleep(0.1)
            assert c.degraded

            await asyncio.to_thread(private_redis.start)    # same port, empty (no persistence)
            deadline = time.monotonic() + 5
            while await c.get("k") != b"again":
                assert time.monotonic() < deadline, "the cache did not come back"
                await c.set("k", b"again", 30)
                await asyncio.sleep(0.05)
            assert not c.degraded
            assert await c.set_nx("l", b"t", 5) and await c.extend_if("l", b"t", 5)
            await c.xadd("x", {b"a": b"b"}, 5)
            assert [f for _, f in await c.xread_from("x", b"0", 100)] == [{b"a": b"b"}]
            assert await c.next_counter("m", 10) == 1
        finally:
            await c.close()

    run(scenario())
    assert len(outage_warnings(caplog)) == 1
    assert len(recoveries(caplog)) == 1


def test_redis_cancelled_callers_leave_the_pool_usable(redis_url: str, raw_redis: redis.Redis) -> None:
    """Callers cancelled while connections are still being set up (SELECT of db 15 in flight) must
    not leave a connection behind that talks to the wrong database or is out of step."""
    prefix = f"test:{secrets.token_hex(6)}:"

    async def scenario() -> None:
        c = RedisCache(redis_url, prefix=prefix, timeout=HEALTHY_TIMEOUT)
        try:
            for _ in range(5):
                callers = [asyncio.create_task(c.get(f"k{i}")) for i in range(20)]
                await asyncio.sleep(0)
                for caller in callers:
                    caller.cancel()
                await asyncio.gather(*callers, return_exceptions=True)
            for i in range(50):
                await c.set(f"k{i}", b"%d" % i, 30)
            assert c.failures == 0, "a timeout or connection error: see the captured log"
            assert [await c.get(f"k{i}") for i in range(50)] == [b"%d" % i for i in range(50)]
        finally:
            await c.close()

    try:
        run(scenario())
        assert raw_redis.get(prefix + "k7") == b"7"       # written to the configured database
    finally:
        leftover = list(raw_redis.scan_iter(match=prefix + "*"))
        if leftover:
            raw_redis.delete(*leftover)


def test_redis_a_full_connection_pool_is_a_miss_not_an_outage(redis_url: str, raw_redis: redis.Redis,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """More concurrent calls than pooled connections: the extra ones answer their miss value at
    once (``pool_full``), Redis is not declared unavailable, and the next calls use it again."""
    prefix = f"test:{secrets.token_hex(6)}:"

    async def scenario() -> None:
        c = RedisCache(redis_url, prefix=prefix, timeout=HEALTHY_TIMEOUT, max_connections=2)
        try:
            await c.set("k", b"v", 30)
            answers = await asyncio.gather(*(c.get("k") for _ in range(20)))
            assert set(answers) == {b"v", None} and answers.count(b"v") >= 2
            assert c.pool_full == answers.count(None) > 0
            assert c.failures == 0 and not c.degraded
            assert [await c.get("k") for _ in range(5)] == [b"v"] * 5   # Redis still in use
        finally:
            await c.close()

    with caplog.at_level(logging.INFO, logger="cache.redis"):
        try:
            run(scenario())
        finally:
            leftover = list(raw_redis.scan_iter(match=prefix + "*"))
            if leftover:
                raw_redis.delete(*leftover)
    assert "unavailable" not in caplog.text
    assert sum("pooled connections busy" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING) == 1
