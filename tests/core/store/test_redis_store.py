"""RedisStore specifics, against the real server: one round trip, TTLs, prefixes, clients."""

from __future__ import annotations

from typing import Any

import pytest

from agentic_iam.core.store import RateLimit, RedisStore

from ._support import req

GRANT = "iss|child"


def test_admit_is_a_single_evalsha_round_trip(redis_url: str, redis_prefix: str) -> None:
    import redis

    commands: list[str] = []

    class Counting(redis.Redis):
        def execute_command(self, *args: Any, **options: Any) -> Any:
            commands.append(str(args[0]))
            return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    client = Counting.from_url(redis_url, decode_responses=True, socket_timeout=5.0)
    store = RedisStore(prefix=redis_prefix, client=client, initialize=True)
    try:
        charges = ((GRANT, {"cost": 100}), ("iss|parent", {"cost": 100}))
        store.admit(req("warm", charges=charges, amounts={"cost": 1}))  # loads the script once
        commands.clear()
        result = store.admit(
            req(
                "r1",
                charges=charges,
                amounts={"cost": 1},
                revocation_keys=(GRANT, "iss|parent"),
                rate_limits=(RateLimit("agent:a", 100.0, 10), RateLimit("exec:b", 100.0, 10)),
            )
        )
        assert result.outcome == "admitted"
        assert commands == ["EVALSHA"]
    finally:
        store.close()
        client.ping()  # a client handed in is not closed by the store
        client.close()


def test_every_key_expires_except_the_epoch_and_the_two_indexes(
    redis_url: str, redis_prefix: str
) -> None:
    import redis

    store = RedisStore(redis_url, prefix=redis_prefix, timeout_s=5.0, initialize=True)
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        store.admit(
            req(
                "r1",
                charges=((GRANT, {"cost": 10}), ("iss|parent", {})),
                amounts={"cost": 1},
                rate_limits=(RateLimit("agent:a", 1.0, 5),),
            )
        )
        store.admit(req("r2", amounts={"cost": 1}))
        store.settle("r1", {})
        store.charge(["iss|other"], {"llm_tokens": 5})
        store.add_risk(GRANT, 1, ["untrusted"], "tool:x#1")
        store.append_event(GRANT, {"e": 1})
        store.add_values(GRANT, {"d": "request"})
        store.revoke("iss|revoked", expires_at=2_000_000_000)
        store.put_approval("req-1", "bind-1", {}, ttl_s=60)
        keys = sorted(admin.scan_iter(match=f"{redis_prefix}*"))
        assert len(keys) >= 12
        forever = [k for k in keys if admin.pttl(k) < 0]
        # r2 is still reserved (index "rexp") and req-1 pending (index "apx"): both indexes
        # lose their members as they settle or expire, and then disappear. The epoch must
        # never expire: its absence means "state lost" and denies every call.
        assert sorted(forever) == [
            f"{redis_prefix}apx", f"{redis_prefix}epoch", f"{redis_prefix}rexp"
        ]
        store.release("r2")
        assert admin.exists(f"{redis_prefix}rexp") == 0
    finally:
        admin.close()
        store.close()


def test_prefixes_isolate_stores(redis_url: str, redis_prefix: str) -> None:
    a = RedisStore(redis_url, prefix=f"{redis_prefix}a:", initialize=True)
    b = RedisStore(redis_url, prefix=f"{redis_prefix}b:", initialize=True)
    try:
        a.charge([GRANT], {"cost": 10})
        a.revoke(GRANT, expires_at=2_000_000_000)
        assert b.remaining(GRANT, {"cost": 10}) == {"cost": 10}
        assert b.revoked([GRANT]) == frozenset()
    finally:
        a.close()
        b.close()


def test_client_without_decode_responses_works(redis_url: str, redis_prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)  # replies are bytes
    store = RedisStore(prefix=redis_prefix, client=client, initialize=True)
    try:
        result = store.admit(req("r1", charges=((GRANT, {"cost": 10}),), amounts={"cost": 3}))
        assert dict(result.remaining) == {"cost": 7}
        store.add_risk(GRANT, 2, ["l"], "t")
        assert store.session_state(GRANT).labels == frozenset({"l"})
        store.put_approval("q", "b", {"k": "v"}, ttl_s=10)
        assert store.get_approval("q") == store.list_approvals()[0]
    finally:
        client.close()


def test_large_amounts_stay_exact(redis_url: str, redis_prefix: str) -> None:
    """Lua numbers are doubles printed with 14 digits; the scripts must not lose precision."""
    big = 2**53 - 1
    store = RedisStore(redis_url, prefix=redis_prefix, initialize=True)
    try:
        store.charge([GRANT], {"cost": 123_456_789_012_345})
        assert store.remaining(GRANT, {"cost": big}) == {"cost": big - 123_456_789_012_345}
        result = store.admit(
            req("r1", charges=((GRANT, {"cost": big}),), amounts={"cost": 9_007_199_254_740})
        )
        assert result.outcome == "admitted"
        assert dict(result.remaining) == {"cost": big - 123_456_789_012_345 - 9_007_199_254_740}
    finally:
        store.close()


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("inf")])
def test_bad_timeouts_are_refused(timeout_s: float) -> None:
    pytest.importorskip("redis")
    from agentic_iam.errors import StoreError

    with pytest.raises(StoreError):
        RedisStore(timeout_s=timeout_s)
