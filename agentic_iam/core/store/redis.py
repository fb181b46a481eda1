"""Redis store: many hosts sharing budgets, rate limits, revocations, sessions and approvals.

Every operation is ONE Lua script (registered once, run with EVALSHA): one round trip, and
atomic, because Redis runs a script without interleaving any other command. A script is not a
transaction, though: a runtime error leaves the writes made before it. So each script does all
of its checks (reads) first and its writes last, and the writes are plain commands on our own
keys that cannot fail. The only writes before the checks are the release of expired
reservations, which is a complete state transition of its own.

Clock: GCRA, reservation expiry and approvals use the server's ``TIME`` inside the script, so
hosts with skewed clocks still agree. Scripts are replicated by effects (the default since Redis
5 and the only mode since 7), which makes calling ``TIME`` before writing legal.

Timeouts: the client is built with ``socket_timeout = socket_connect_timeout = timeout_s`` and
*no retries* (redis-py retries 10 times by default, which would multiply the timeout and could
run a non-idempotent ``admit`` twice). Any redis-py error becomes
:class:`~agentic_iam.errors.StoreUnavailableError` naming the operation. An ``admit`` that timed
out may still have run on the server; its reservation is then never settled and expires after
``reservation_ttl_s``, so counters become consistent again on their own.

Numbers: Lua numbers are doubles and ``tostring``/``cjson.encode`` print only 14 significant
digits, so the scripts format every number they store or return with ``string.format`` and
return integers as Redis integers (exact below 2**53, see ``MAX_AMOUNT``).

Keys (all under ``prefix``; every key has a TTL except ``epoch`` and the two indexes, whose
members are removed as they expire): ``epoch`` the store's epoch; ``b:<grant>`` budget hash
(``s:<dim>`` spent, ``r:<dim>`` reserved); ``r:<id>`` reservation hash; ``rexp`` zset of
reservations by expiry; ``rl:<key>`` GCRA theoretical arrival time; ``rv:<key>`` revocation;
``s:<session>`` session hash (``calls``, ``risk``, ``a:<action>``, ``l:<label>``, ``t`` taint
JSON); ``e:<session>`` event list; ``v:<session>`` value labels (``d:<digest>``, ``n`` counter)
with ``vr:<session>`` zset in eviction order (score ``rank * 2**40 + seq``: lowest label rank
first, oldest first within it); ``ap:<id>`` approval hash, ``ab:<binding>`` set of request ids,
``apx`` zset by expiry.

State loss: a Redis that restarts without persistence (or evicts keys) comes back empty, and
forgotten budgets and revocations would turn into allows. So every script first reads the
``epoch`` key, inside the same script (no extra round trip): missing means the state is gone
and the script returns the error ``AIAM_STATE_LOST`` before touching anything, which the client
raises as :class:`~agentic_iam.errors.StoreStateLostError`; present but different from the
epoch the client knows returns ``AIAM_EPOCH <epoch>``, and the client adopts it (with a
warning, unless it knew none yet) and runs the script again. Only ``initialize=True`` and
``aiam store init`` create the epoch, and ``epoch`` has no TTL. Production servers need
``appendonly yes`` and ``maxmemory-policy noeviction`` (see the README).

Cluster: NOT supported. Scripts compute key names (a reservation names the grants it must
release) instead of declaring them all in ``KEYS``, which Redis Cluster forbids, and one call
touches keys of unrelated hash slots (a per-agent rate limit and a per-grant budget). Use a
single primary (with replicas and Sentinel for failover). This module must never be pointed at
a cluster, and never retry a failed ``admit`` on its own.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agentic_iam.core.store.base import (
    DEFAULT_MAX_VALUES,
    DEFAULT_STATE_TTL_S,
    MAX_TAINT_SOURCES,
    REVOCATION_GRACE_S,
    AdmitRequest,
    AdmitResult,
    FinishRequest,
    SessionState,
    approval_record,
    check_admit,
    check_amounts,
    check_bound,
    check_finish,
    check_int,
    check_key,
    check_label,
    check_limits,
    check_positive,
    check_values,
    distinct_grants,
    dump_json,
    make_result,
    make_session,
    new_epoch,
    remaining_of,
    result_dims,
    state_lost,
)
from agentic_iam.errors import ApprovalError, MissingExtraError, StoreError, StoreUnavailableError

if TYPE_CHECKING:
    import redis as redis_py

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

# Shared by every script. ARGV[1] = key prefix, ARGV[2] = state TTL in ms; the operation's own
# arguments start at ARGV[3]; the LAST argument is the epoch the client knows ('' if none yet).
_PRELUDE = r"""
local P = ARGV[1]
local STATE_TTL_MS = tonumber(ARGV[2])

-- The epoch check comes before any read or write of state (see the module docstring). A
-- script that returns here has changed nothing.
local EPOCH = redis.call('GET', P .. 'epoch')
if not EPOCH then return redis.error_reply('AIAM_STATE_LOST') end
if EPOCH ~= ARGV[#ARGV] then return redis.error_reply('AIAM_EPOCH ' .. EPOCH) end

local function fint(n) return string.format('%d', n) end

local function clock_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function to_hash(flat)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

-- Settle (actual is a table: dim -> int, an absent dim is charged in full) or release
-- (actual == nil) one reservation. Returns 1 if it existed.
local function finish(id, actual)
  local rk = P .. 'r:' .. id
  local h = to_hash(redis.call('HGETALL', rk))
  redis.call('ZREM', P .. 'rexp', id)
  if h['s'] == nil then return 0 end
  local grants = cjson.decode(h['g'])
  local risk_back = 0
  for field, value in pairs(h) do
    if string.sub(field, 1, 2) == 'm:' then
      local dim = string.sub(field, 3)
      local reserved = tonumber(value)
      local charged = 0
      if actual ~= nil then
        local a = actual[dim]
        if a == nil or a > reserved then charged = reserved else charged = a end
      end
      for _, g in ipairs(grants) do
        local bk = P .. 'b:' .. g
        if redis.call('EXISTS', bk) == 1 then
          if redis.call('HINCRBY', bk, 'r:' .. dim, fint(-reserved)) < 0 then
            redis.call('HSET', bk, 'r:' .. dim, '0')
          end
          if charged > 0 then
            redis.call('HINCRBY', bk, 's:' .. dim, fint(charged))
            redis.call('PEXPIRE', bk, fint(STATE_TTL_MS))
          end
        end
      end
      if dim == 'risk' then risk_back = reserved - charged end
    end
  end
  local sk = P .. 's:' .. h['s']
  if redis.call('EXISTS', sk) == 1 then
    if actual == nil then
      if redis.call('HINCRBY', sk, 'calls', -1) < 0 then
        redis.call('HSET', sk, 'calls', '0')
      end
      if redis.call('HINCRBY', sk, 'a:' .. h['a'], -1) <= 0 then
        redis.call('HDEL', sk, 'a:' .. h['a'])
      end
    end
    if risk_back ~= 0 then
      if redis.call('HINCRBY', sk, 'risk', fint(-risk_back)) < 0 then
        redis.call('HSET', sk, 'risk', '0')
      end
    end
  end
  redis.call('DEL', rk)
  return 1
end

-- add_risk on one session hash: risk, labels and taint sources (each once, the newest
-- max_sources kept, oldest first).
local function observe(sk, amount, labels, sources, max_sources)
  redis.call('HINCRBY', sk, 'risk', fint(amount))
  for _, label in ipairs(labels) do redis.call('HSET', sk, 'l:' .. label, '1') end
  if #sources > 0 then
    local list = {}
    local text = redis.call('HGET', sk, 't')
    if text then list = cjson.decode(text) end
    local changed = false
    for _, source in ipairs(sources) do
      local present = false
      for _, s in ipairs(list) do if s == source then present = true end end
      if not present then
        table.insert(list, source)
        changed = true
        while #list > max_sources do table.remove(list, 1) end
      end
    end
    if changed then redis.call('HSET', sk, 't', cjson.encode(list)) end
  end
  redis.call('PEXPIRE', sk, fint(STATE_TTL_MS))
end

-- add_values on one session: items are {digest, label} pairs.
local function add_values(session, items, max)
  local rank = {untrusted = 1, trusted = 2, request = 3}
  local SPAN = 1099511627776  -- 2**40 sequence numbers per rank; 3 * 2**40 stays below 2**53
  local vk = P .. 'v:' .. session
  local ok = P .. 'vr:' .. session
  local seq = redis.call('HINCRBY', vk, 'n', #items) - #items
  for _, pair in ipairs(items) do
    seq = seq + 1
    local best = redis.call('HGET', vk, 'd:' .. pair[1])
    if (not best) or rank[pair[2]] > (rank[best] or 0) then
      best = pair[2]
      redis.call('HSET', vk, 'd:' .. pair[1], best)
    end
    -- re-added = newest within its rank; a lower rank sorts first, so eviction below takes
    -- every untrusted value before any trusted one, and every trusted before any request
    redis.call('ZADD', ok, fint(rank[best] * SPAN + seq), pair[1])
  end
  local count = redis.call('ZCARD', ok)
  if count > max then
    for _, digest in ipairs(redis.call('ZRANGE', ok, 0, count - max - 1)) do
      redis.call('HDEL', vk, 'd:' .. digest)
    end
    redis.call('ZREMRANGEBYRANK', ok, 0, count - max - 1)
  end
  redis.call('PEXPIRE', vk, fint(STATE_TTL_MS))
  redis.call('PEXPIRE', ok, fint(STATE_TTL_MS))
end

-- Release expired reservations, oldest first, at most 100 per call so a script stays short.
-- Any left over keep their amounts reserved a little longer: that errs towards denying.
local function sweep(now_ms)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'rexp', '-inf', fint(now_ms), 'LIMIT', 0, 100)
  for _, id in ipairs(ids) do finish(id, nil) end
end
"""

_ADMIT = r"""
local req = cjson.decode(ARGV[3])
local now = clock_us()
local now_ms = math.floor(now / 1000)
sweep(now_ms)
local rk = P .. 'r:' .. req.id
if redis.call('EXISTS', rk) == 1 then return {'duplicate'} end
local sk = P .. 's:' .. req.session
local before = redis.call('HGETALL', sk)
local function calling()
  if req.grants[1] == nil then return {} end
  return redis.call('HGETALL', P .. 'b:' .. req.grants[1])
end

-- (1) revocation
for _, k in ipairs(req.revoke) do
  if redis.call('EXISTS', P .. 'rv:' .. k) == 1 then
    return {'revoked', k, '0', calling(), before}
  end
end

-- (2) rate limits (GCRA, microseconds); nothing is stored unless every limit allows the call
local tats = {}
local refused = nil
local retry = 0
for _, rl in ipairs(req.rates) do
  local key = P .. 'rl:' .. rl[1]
  local tat = tats[key]
  if tat == nil then tat = tonumber(redis.call('GET', key) or '0') end
  if tat < now then tat = now end
  local interval = 1000000 / rl[2]
  local new_tat = tat + interval
  local ahead = new_tat - now - rl[3] * interval
  if ahead > 1 then
    if refused == nil then refused = rl[1] end
    if ahead > retry then retry = ahead end
  else
    tats[key] = new_tat
  end
end
if refused ~= nil then
  return {'rate_limited', refused, string.format('%.6f', retry / 1000000), calling(), before}
end

-- (3) budgets on every charge
local amounts = {}
for _, pair in ipairs(req.amounts) do amounts[pair[1]] = pair[2] end
local budgets = {}
for _, ch in ipairs(req.charges) do
  local b = budgets[ch[1]]
  if b == nil then
    b = to_hash(redis.call('HGETALL', P .. 'b:' .. ch[1]))
    budgets[ch[1]] = b
  end
  for _, lim in ipairs(ch[2]) do
    local dim = lim[1]
    local used = tonumber(b['s:' .. dim] or '0') + tonumber(b['r:' .. dim] or '0')
      + (amounts[dim] or 0)
    if used > lim[2] then
      return {'budget_exhausted', ch[1] .. '|' .. dim, '0', calling(), before}
    end
  end
end

-- (4) every check passed: write
for key, tat in pairs(tats) do
  -- the state means nothing once its TAT has passed: let it expire a second later
  local ttl_ms = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', key, string.format('%.17g', tat), 'PX', fint(ttl_ms))
end
local keep_ms = fint(STATE_TTL_MS + req.ttl_ms)
for _, g in ipairs(req.grants) do
  local bk = P .. 'b:' .. g
  for _, pair in ipairs(req.amounts) do
    redis.call('HINCRBY', bk, 'r:' .. pair[1], fint(pair[2]))
  end
  redis.call('PEXPIRE', bk, keep_ms)
end
redis.call('HINCRBY', sk, 'calls', 1)
redis.call('HINCRBY', sk, 'a:' .. req.action, 1)
if (amounts['risk'] or 0) > 0 then redis.call('HINCRBY', sk, 'risk', fint(amounts['risk'])) end
redis.call('PEXPIRE', sk, keep_ms)
local exp_ms = now_ms + req.ttl_ms
local fields = {'s', req.session, 'a', req.action, 'g', ARGV[4], 'e', fint(exp_ms)}
for _, pair in ipairs(req.amounts) do
  table.insert(fields, 'm:' .. pair[1])
  table.insert(fields, fint(pair[2]))
end
redis.call('HSET', rk, unpack(fields))
redis.call('PEXPIRE', rk, keep_ms)
redis.call('ZADD', P .. 'rexp', fint(exp_ms), req.id)
-- the request's seeds, then argument provenance, in the same round trip
if #req.seed > 0 then add_values(req.session, req.seed, req.seed_max) end
local labels = {}
local vk = P .. 'v:' .. req.session
for i, digest in ipairs(req.values or {}) do
  labels[i] = redis.call('HGET', vk, 'd:' .. digest) or ''
end
return {'admitted', '', '0', calling(), before, labels}
"""

_SETTLE = r"""
local id = ARGV[3]
local now_ms = math.floor(clock_us() / 1000)
sweep(now_ms)
local exp = redis.call('HGET', P .. 'r:' .. id, 'e')
if not exp then return 0 end
if tonumber(exp) <= now_ms then
  finish(id, nil)  -- expired: released, never charged
  return 0
end
return finish(id, cjson.decode(ARGV[4]))
"""

# One call's end (Store.finish): observations, then settle (req.actual present) or release,
# then the event. ARGV[3] = the request as JSON, ARGV[4] = MAX_TAINT_SOURCES.
_FINISH = r"""
local req = cjson.decode(ARGV[3])
local now_ms = math.floor(clock_us() / 1000)
sweep(now_ms)
if req.observe then
  observe(P .. 's:' .. req.session, req.risk, req.labels, req.taint, tonumber(ARGV[4]))
end
if #req.values > 0 then add_values(req.session, req.values, req.max_values) end
if req.id ~= nil then
  local exp = redis.call('HGET', P .. 'r:' .. req.id, 'e')
  if exp then
    if req.actual == nil or tonumber(exp) <= now_ms then
      finish(req.id, nil)  -- released; an expired one is never charged
    else
      finish(req.id, req.actual)
    end
  end
end
if req.event ~= nil then
  local ek = P .. 'e:' .. req.session
  redis.call('RPUSH', ek, req.event)
  redis.call('LTRIM', ek, -req.max_events, -1)
  redis.call('PEXPIRE', ek, fint(STATE_TTL_MS))
end
return 1
"""

_RELEASE = r"""
sweep(math.floor(clock_us() / 1000))
return finish(ARGV[3], nil)
"""

_CHARGE = r"""
local grants = cjson.decode(ARGV[3])
local amounts = cjson.decode(ARGV[4])
for _, g in ipairs(grants) do
  local bk = P .. 'b:' .. g
  for _, pair in ipairs(amounts) do
    redis.call('HINCRBY', bk, 's:' .. pair[1], fint(pair[2]))
  end
  redis.call('PEXPIRE', bk, fint(STATE_TTL_MS))
end
return 1
"""

_REMAINING = r"""
sweep(math.floor(clock_us() / 1000))
return redis.call('HGETALL', P .. 'b:' .. ARGV[3])
"""

_ADD_RISK = r"""
sweep(math.floor(clock_us() / 1000))
local sk = P .. 's:' .. ARGV[3]
local sources = {}
if ARGV[6] ~= '' then sources = {ARGV[6]} end
observe(sk, tonumber(ARGV[4]), cjson.decode(ARGV[5]), sources, tonumber(ARGV[7]))
return redis.call('HGETALL', sk)
"""

_SESSION_STATE = r"""
sweep(math.floor(clock_us() / 1000))
return redis.call('HGETALL', P .. 's:' .. ARGV[3])
"""

_APPEND_EVENT = r"""
local ek = P .. 'e:' .. ARGV[3]
redis.call('RPUSH', ek, ARGV[4])
redis.call('LTRIM', ek, -tonumber(ARGV[5]), -1)
redis.call('PEXPIRE', ek, fint(STATE_TTL_MS))
return 1
"""

_EVENTS = r"""
return redis.call('LRANGE', P .. 'e:' .. ARGV[3], 0, -1)
"""

_ADD_VALUES = r"""
add_values(ARGV[3], cjson.decode(ARGV[4]), tonumber(ARGV[5]))
return 1
"""

_VALUE_LABELS = r"""
local vk = P .. 'v:' .. ARGV[3]
local out = {}
for i, digest in ipairs(cjson.decode(ARGV[4])) do
  out[i] = redis.call('HGET', vk, 'd:' .. digest) or ''
end
return out
"""

_REVOKE = r"""
local now_ms = math.floor(clock_us() / 1000)
local target = math.max(tonumber(ARGV[4]) * 1000, now_ms) + tonumber(ARGV[5]) * 1000
-- an absurd expires_at must not overflow PXAT: ten years is "forever" for an execution token
target = math.min(target, now_ms + 315360000000)
local k = P .. 'rv:' .. ARGV[3]
local left = redis.call('PTTL', k)
if left == -1 or (left >= 0 and now_ms + left >= target) then return 0 end
redis.call('SET', k, '1', 'PXAT', fint(target))
return 1
"""

_REVOKED = r"""
local out = {}
for _, k in ipairs(cjson.decode(ARGV[3])) do
  if redis.call('EXISTS', P .. 'rv:' .. k) == 1 then table.insert(out, k) end
end
return out
"""

_PUT_APPROVAL = r"""
local now = clock_us()
local now_ms = math.floor(now / 1000)
local ak = P .. 'ap:' .. ARGV[3]
if redis.call('EXISTS', ak) == 1 then return 0 end
local ttl_ms = tonumber(ARGV[6])
local exp_ms = now_ms + ttl_ms
redis.call('HSET', ak, 'request_id', ARGV[3], 'binding', ARGV[4], 'status', 'pending',
  'approver', '', 'payload', ARGV[5], 'created_at', string.format('%.6f', now / 1000000),
  'expires_at', string.format('%.3f', exp_ms / 1000))
redis.call('PEXPIREAT', ak, fint(exp_ms))
local bk = P .. 'ab:' .. ARGV[4]
redis.call('SADD', bk, ARGV[3])
local left = redis.call('PTTL', bk)
if left < ttl_ms then redis.call('PEXPIREAT', bk, fint(exp_ms)) end
redis.call('ZADD', P .. 'apx', fint(exp_ms), ARGV[3])
return 1
"""

_RESOLVE_APPROVAL = r"""
local now_ms = math.floor(clock_us() / 1000)
local ak = P .. 'ap:' .. ARGV[3]
local h = to_hash(redis.call('HGETALL', ak))
if h['status'] == nil or tonumber(h['expires_at']) * 1000 <= now_ms then return {'unknown'} end
if h['status'] ~= 'pending' then return {'resolved', h['status']} end
redis.call('HSET', ak, 'status', ARGV[4], 'approver', ARGV[5])
return {'ok', redis.call('HGETALL', ak)}
"""

_CONSUME_APPROVAL = r"""
local now_ms = math.floor(clock_us() / 1000)
local bk = P .. 'ab:' .. ARGV[3]
local best, best_created = nil, nil
for _, id in ipairs(redis.call('SMEMBERS', bk)) do
  local ak = P .. 'ap:' .. id
  local v = redis.call('HMGET', ak, 'status', 'expires_at', 'created_at')
  if not v[1] then
    redis.call('SREM', bk, id)
  elseif v[1] == 'approved' and tonumber(v[2]) * 1000 > now_ms then
    if best == nil or tonumber(v[3]) < best_created then
      best, best_created = ak, tonumber(v[3])
    end
  end
end
if best == nil then return 0 end
redis.call('HSET', best, 'status', 'consumed')
return 1
"""

_GET_APPROVAL = r"""
local now_ms = math.floor(clock_us() / 1000)
local flat = redis.call('HGETALL', P .. 'ap:' .. ARGV[3])
local h = to_hash(flat)
if h['expires_at'] == nil or tonumber(h['expires_at']) * 1000 <= now_ms then return {} end
return flat
"""

_LIST_APPROVALS = r"""
local now_ms = math.floor(clock_us() / 1000)
local ix = P .. 'apx'
redis.call('ZREMRANGEBYSCORE', ix, '-inf', fint(now_ms))
local out = {}
for _, id in ipairs(redis.call('ZRANGE', ix, 0, -1)) do
  local flat = redis.call('HGETALL', P .. 'ap:' .. id)
  if #flat > 0 then table.insert(out, flat) else redis.call('ZREM', ix, id) end
end
return out
"""

_SCRIPTS = {
    "admit": _ADMIT,
    "settle": _SETTLE,
    "finish": _FINISH,
    "release": _RELEASE,
    "charge": _CHARGE,
    "remaining": _REMAINING,
    "add_risk": _ADD_RISK,
    "session_state": _SESSION_STATE,
    "append_event": _APPEND_EVENT,
    "events": _EVENTS,
    "add_values": _ADD_VALUES,
    "value_labels": _VALUE_LABELS,
    "revoke": _REVOKE,
    "revoked": _REVOKED,
    "put_approval": _PUT_APPROVAL,
    "resolve_approval": _RESOLVE_APPROVAL,
    "consume_approval": _CONSUME_APPROVAL,
    "get_approval": _GET_APPROVAL,
    "list_approvals": _LIST_APPROVALS,
}

# Outside the epoch check: create the epoch if absent (ARGV[3] = 1 to replace one that
# exists), and return {epoch, created}.
_INIT_EPOCH = r"""
local k = ARGV[1] .. 'epoch'
local current = redis.call('GET', k)
if current and ARGV[3] ~= '1' then return {current, 0} end
redis.call('SET', k, ARGV[2])
return {ARGV[2], 1}
"""


class RedisStore:
    """A :class:`~agentic_iam.core.store.base.Store` on a Redis server shared by many hosts.

    ``client``: an existing ``redis.Redis`` to use instead of ``url`` (its timeouts and retries
    are then the caller's business, and :meth:`close` leaves it open). ``state_ttl_s``:
    sessions and budgets not written for that long expire.

    ``initialize``: create the epoch under ``prefix`` now if there is none (atomically; an
    existing one is kept). This is one round trip at construction; without it the store does
    no I/O until its first operation. Leave it False in services: after Redis restarts empty,
    every operation then raises :class:`~agentic_iam.errors.StoreStateLostError` (the Guard
    denies) until an operator runs ``aiam store init``; with True, a service restarted after
    the loss would silently start from nothing.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "aiam:",
        timeout_s: float = 0.25,
        client: redis_py.Redis | None = None,
        state_ttl_s: float = DEFAULT_STATE_TTL_S,
        initialize: bool = False,
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise MissingExtraError("redis", "redis") from exc
        check_positive(timeout_s, "timeout_s")
        self._prefix = prefix
        self._state_ttl_ms = str(math.ceil(check_positive(state_ttl_s, "state_ttl_s") * 1000))
        self._redis_error: type[Exception] = redis.RedisError
        self._response_error: type[Exception] = redis.ResponseError
        self._epoch: str | None = None
        self._owns_client = client is None
        if client is None:
            client = redis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # No retries: they multiply the timeout, and a retried admit could run twice.
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        self._client = client
        # register_script computes the SHA locally; the first call loads the script (one extra
        # round trip, once per server), every later call is a single EVALSHA.
        self._scripts = {
            name: client.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }
        self._init_script = client.register_script(_INIT_EPOCH)
        self._url = _safe_url(url) if self._owns_client else None
        self._name = (f"redis store `{self._url}` (prefix `{prefix}`)" if self._url
                      else f"redis store (client handed in, prefix `{prefix}`)")
        if initialize:
            self._epoch = self._init(force=False)[0]

    @property
    def epoch(self) -> str | None:
        """The epoch this client saw first (or adopted); None before its first operation."""
        return self._epoch

    def read_epoch(self) -> str | None:
        """The epoch the server holds now under this prefix (None: lost or never initialised)."""
        try:
            value = self._client.get(self._prefix + "epoch")
        except self._redis_error as exc:
            raise StoreUnavailableError(
                f"{self._name}: `read_epoch` failed: {type(exc).__name__}: {exc}"
            ) from exc
        return None if value is None else str(_text(value))

    def init_epoch(self, *, force: bool = False) -> str:
        """Create the epoch under this prefix and return it (``aiam store init``).

        Refuses (``StoreError``) if there is one already, unless ``force``: then a new epoch
        replaces it and running clients adopt it with a warning. State is kept.
        """
        epoch, created = self._init(force=force)
        if not created:
            raise StoreError(
                f"{self._name} already has epoch `{epoch}`; use --force to replace it"
            )
        self._epoch = epoch
        return epoch

    def persistence(self) -> dict[str, str]:
        """The server's persistence and eviction settings (``CONFIG GET``), for ``aiam store
        status``; a server that forbids CONFIG gives an empty mapping."""
        out: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
            try:
                reply = self._client.config_get(name)
            except self._response_error:
                return {}  # CONFIG renamed or forbidden (managed services): unknown
            except self._redis_error as exc:
                raise StoreUnavailableError(
                    f"{self._name}: `persistence` failed: {type(exc).__name__}: {exc}"
                ) from exc
            for key, value in _text(reply).items() if isinstance(reply, dict) else ():
                out[str(_text(key))] = str(_text(value))
        return out

    def _init(self, *, force: bool) -> tuple[str, bool]:
        try:
            reply = _text(self._init_script(
                args=[self._prefix, new_epoch(), "1" if force else "0"]))
        except self._redis_error as exc:
            raise StoreUnavailableError(
                f"{self._name}: `init_epoch` failed: {type(exc).__name__}: {exc}"
            ) from exc
        return str(reply[0]), bool(reply[1])

    def _call(self, op: str, *args: str) -> Any:
        # At most two runs: the second only after the script refused, unchanged, to run on an
        # epoch this client did not know yet.
        for _ in range(2):
            try:
                reply = self._scripts[op](
                    args=[self._prefix, self._state_ttl_ms, *args, self._epoch or ""])
            except self._response_error as exc:
                message = str(exc)
                if message.startswith("AIAM_STATE_LOST"):
                    raise state_lost(
                        self._name,
                        "the server holds no epoch under this prefix: its state was lost "
                        "(a restart without persistence, a flush, evicted keys) or it was "
                        "never initialised",
                        self._init_spec(),
                    ) from None
                if message.startswith("AIAM_EPOCH "):
                    self._adopt(message.removeprefix("AIAM_EPOCH "))
                    continue
                raise StoreUnavailableError(
                    f"{self._name}: `{op}` failed: {type(exc).__name__}: {exc}"
                ) from exc
            except self._redis_error as exc:
                raise StoreUnavailableError(
                    f"{self._name}: `{op}` failed: {type(exc).__name__}: {exc}"
                ) from exc
            return _text(reply)
        raise StoreUnavailableError(f"{self._name}: `{op}` failed: the epoch keeps changing")

    def _adopt(self, epoch: str) -> None:
        if self._epoch is not None:
            log.warning("%s: epoch changed from %s to %s (re-initialised by an operator); "
                        "adopting it", self._name, self._epoch, epoch)
        self._epoch = epoch

    def _init_spec(self) -> str:
        spec = self._url or "redis://HOST:PORT/DB"
        return spec if self._prefix == "aiam:" else f"{spec} --prefix {self._prefix}"

    # --- budgets and rate limits ------------------------------------------------------------

    def admit(self, request: AdmitRequest) -> AdmitResult:
        check_admit(request)
        grants = distinct_grants(request.charges)
        positive = sorted((dim, amount) for dim, amount in request.amounts.items() if amount > 0)
        calling_limits = (
            check_limits(request.charges[0].limits, "limits") if request.charges else {}
        )
        encoded = json.dumps(
            {
                "id": request.reservation_id,
                "session": request.session,
                "action": request.action,
                "revoke": list(request.revocation_keys),
                "rates": [[r.key, float(r.per_second), r.burst] for r in request.rate_limits],
                "charges": [
                    [c.grant, [[d, lim] for d, lim in sorted(c.limits.items()) if lim is not None]]
                    for c in request.charges
                ],
                "grants": list(grants),
                "amounts": positive,
                "ttl_ms": max(1, math.ceil(request.reservation_ttl_s * 1000)),
                "values": list(request.value_digests),
                "seed": [[d, label] for d, label in check_values(request.seed_values,
                                                                 "seed_values")],
                "seed_max": DEFAULT_MAX_VALUES,
            }
        )
        # The grant list is passed again as its own JSON text so the script stores it verbatim.
        reply = self._call("admit", encoded, json.dumps(list(grants)))
        if reply[0] == "duplicate":
            raise StoreError(f"reservation `{request.reservation_id}` already exists")
        outcome, detail, retry, grant_flat, session_flat = reply[:5]
        found = reply[5] if len(reply) > 5 else []
        labels = {
            digest: _text(label)
            for digest, label in zip(request.value_digests, found, strict=False)
            if _text(label)
        }
        spent, reserved = _budget(grant_flat)
        return make_result(
            outcome,
            detail,
            float(retry),
            remaining_of(result_dims(request), calling_limits, spent, reserved),
            _session(session_flat),
            labels,
        )

    def settle(self, reservation_id: str, actual: Mapping[str, int]) -> None:
        check_key(reservation_id, "reservation_id")
        self._call("settle", reservation_id, json.dumps(check_amounts(actual, "actual")))

    def release(self, reservation_id: str) -> None:
        check_key(reservation_id, "reservation_id")
        self._call("release", reservation_id)

    def finish(self, request: FinishRequest) -> None:
        """See :meth:`Store.finish`: one script, one round trip."""
        event = check_finish(request)
        body: dict[str, Any] = {
            "session": request.session,
            "observe": request.observes,
            "risk": request.risk,
            "labels": sorted(set(request.labels)),
            "taint": list(request.tainted_by),
            "values": [[d, label] for d, label in request.values.items()],
            "max_values": request.max_values,
            "max_events": request.max_events,
        }
        # Absent, not null: cjson decodes null to a value that is true in Lua.
        if request.reservation_id is not None:
            body["id"] = request.reservation_id
            if request.actual is not None:
                body["actual"] = dict(request.actual)
        if event is not None:
            body["event"] = event
        self._call("finish", json.dumps(body), str(MAX_TAINT_SOURCES))

    def charge(self, grants: Sequence[str], amounts: Mapping[str, int]) -> None:
        grant_keys = list(dict.fromkeys(check_key(g, "grants[]") for g in grants))
        pairs = sorted(check_amounts(amounts, "amounts").items())
        self._call("charge", json.dumps(grant_keys), json.dumps(pairs))

    def remaining(self, grant: str, limits: Mapping[str, int | None]) -> Mapping[str, int | None]:
        check_key(grant, "grant")
        limits = check_limits(limits, "limits")
        spent, reserved = _budget(self._call("remaining", grant))
        return remaining_of(limits, limits, spent, reserved)

    # --- sessions ----------------------------------------------------------------------------

    def add_risk(
        self,
        session: str,
        amount: int,
        labels: Iterable[str] = (),
        tainted_by: str | None = None,
    ) -> SessionState:
        check_key(session, "session")
        check_int(amount, "amount")
        label_list = sorted({check_key(label, "labels[]") for label in labels})
        if tainted_by is not None:
            check_key(tainted_by, "tainted_by")
        flat = self._call(
            "add_risk",
            session,
            str(amount),
            json.dumps(label_list),
            tainted_by or "",
            str(MAX_TAINT_SOURCES),
        )
        return _session(flat)

    def session_state(self, session: str) -> SessionState:
        check_key(session, "session")
        return _session(self._call("session_state", session))

    def append_event(
        self, session: str, event: Mapping[str, Any], *, max_events: int = 256
    ) -> None:
        check_key(session, "session")
        check_bound(max_events, "max_events")
        self._call("append_event", session, dump_json(event, "event"), str(max_events))

    def events(self, session: str) -> list[dict[str, Any]]:
        check_key(session, "session")
        return [json.loads(text) for text in self._call("events", session)]

    def add_values(
        self, session: str, digests: Mapping[str, str], *, max_values: int = 4096
    ) -> None:
        check_key(session, "session")
        check_bound(max_values, "max_values")
        items = [[check_key(d, "digest"), check_label(label)] for d, label in digests.items()]
        if items:
            self._call("add_values", session, json.dumps(items), str(max_values))

    def value_labels(self, session: str, digests: Sequence[str]) -> Mapping[str, str]:
        check_key(session, "session")
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return {}
        labels = self._call("value_labels", session, json.dumps(wanted))
        return {digest: label for digest, label in zip(wanted, labels, strict=True) if label}

    # --- revocation ---------------------------------------------------------------------------

    def revoke(self, key: str, *, expires_at: int) -> None:
        check_key(key, "key")
        check_int(expires_at, "expires_at")
        self._call("revoke", key, str(expires_at), str(REVOCATION_GRACE_S))

    def revoked(self, keys: Sequence[str]) -> frozenset[str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return frozenset()
        return frozenset(self._call("revoked", json.dumps(wanted)))

    # --- approvals ----------------------------------------------------------------------------

    def put_approval(
        self, request_id: str, binding: str, payload: Mapping[str, Any], *, ttl_s: float
    ) -> None:
        check_key(request_id, "request_id")
        check_key(binding, "binding")
        ttl_ms = max(1, math.ceil(check_positive(ttl_s, "ttl_s") * 1000))
        text = dump_json(payload, "payload")
        if not self._call("put_approval", request_id, binding, text, str(ttl_ms)):
            raise ApprovalError(f"approval request `{request_id}` already exists")

    def resolve_approval(
        self, request_id: str, *, approved: bool, approver: str
    ) -> Mapping[str, Any]:
        check_key(request_id, "request_id")
        check_key(approver, "approver")
        status = "approved" if approved else "denied"
        reply = self._call("resolve_approval", request_id, status, approver)
        if reply[0] == "unknown":
            raise ApprovalError(f"approval request `{request_id}` is unknown or expired")
        if reply[0] == "resolved":
            raise ApprovalError(
                f"approval request `{request_id}` was already resolved ({reply[1]})"
            )
        return _approval(reply[1])

    def consume_approval(self, binding: str) -> bool:
        check_key(binding, "binding")
        return bool(self._call("consume_approval", binding))

    def get_approval(self, request_id: str) -> Mapping[str, Any] | None:
        check_key(request_id, "request_id")
        flat = self._call("get_approval", request_id)
        return _approval(flat) if flat else None

    def list_approvals(self, status: str | None = None) -> list[Mapping[str, Any]]:
        records = [_approval(flat) for flat in self._call("list_approvals")]
        return sorted(
            (r for r in records if status is None or r["status"] == status),
            key=lambda r: r["created_at"],
        )

    def close(self) -> None:
        """Disconnect, unless the client was handed in (then its owner closes it)."""
        if self._owns_client:
            self._client.close()


# --- reply parsing ----------------------------------------------------------------------------


def _safe_url(url: str) -> str:
    """The URL to show in messages: scheme, host, port and database, never a password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


def _text(reply: Any) -> Any:
    """Decode bytes replies (a client handed in may not use ``decode_responses``)."""
    if isinstance(reply, bytes):
        return reply.decode("utf-8")
    if isinstance(reply, list):
        return [_text(item) for item in reply]
    return reply


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _budget(flat: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    spent: dict[str, int] = {}
    reserved: dict[str, int] = {}
    for field, value in _pairs(flat).items():
        if field.startswith("s:"):
            spent[field[2:]] = int(value)
        elif field.startswith("r:"):
            reserved[field[2:]] = int(value)
    return spent, reserved


def _session(flat: Sequence[str]) -> SessionState:
    fields = _pairs(flat)
    taint = json.loads(fields.get("t", "[]"))
    return make_session(
        int(fields.get("calls", 0)),
        {f[2:]: int(v) for f, v in fields.items() if f.startswith("a:")},
        (f[2:] for f in fields if f.startswith("l:")),
        int(fields.get("risk", 0)),
        taint if isinstance(taint, list) else (),  # cjson writes an empty list as {}
    )


def _approval(flat: Sequence[str]) -> dict[str, Any]:
    h = _pairs(flat)
    return approval_record(
        h["request_id"],
        h["binding"],
        h["status"],
        h["approver"] or None,
        json.loads(h["payload"]),
        float(h["created_at"]),
        float(h["expires_at"]),
    )
