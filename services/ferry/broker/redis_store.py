"""The broker's store on Redis: `RedisStore`, the Store of store.py shared by broker replicas.

Same contract as SqliteStore, method for method (tests/unit/broker/test_store_contract.py runs
one suite against both), over redis-py's asyncio client (`redis.asyncio`): each step is one
round trip that the broker awaits, so its event loop serves other calls meanwhile instead of
blocking for the round trip. Calls of one replica thus interleave between steps just as the
calls of two replicas do, and the same compare-and-set protects both. Needs Redis 7.0 or later
(script flags).

Atomicity across processes: every call that reads and then writes is one Lua script, which
Redis runs with nothing else in between, so two replicas never both win a compare-and-set on
a session's `version` (StaleRecord), never lease overlapping ports, and never both pass an
upload quota. Scripts that write are declared as such (``#!lua``): past Redis's maxmemory
they are refused whole before they run (StorageFull), never cut off halfway. Read-only ones
(``flags=no-writes``) still answer when Redis is full, and so do the ones that only delete
(``flags=allow-oom``: release_lease, delete_upload, delete_ended), which is how a full Redis
gets room back: the sweeper deletes ended sessions first.

Keys, all under a prefix (default ``ferry:``; give each broker deployment its own)::

    {prefix}s:{id}            hash    a session: data (the Session proto), state, version,
                                      sender, receiver, code (hashes), request, verifier,
                                      create, expire, update (seconds since the epoch)
    {prefix}c:{code_hash}     zset    ids of the sessions holding that code hash, by create
    {prefix}q:{request_id}    zset    ids of the sessions created with it, by create
    {prefix}i:{user}          zset    ids of the sessions offered to the person, by create
                                      (pruned by offers_to: ended, deleted, too old)
    {prefix}t:{token_hash}    string  "s:{id}" or "r:{id}": whose token it is (sender/receiver)
    {prefix}live              zset    ids of the sessions in a live state, by expire
    {prefix}ended             zset    ids of the sessions in a final state, by update
    {prefix}l:{id}            hash    the session's port lease: host, first, last, expire,
                                      owner, hold (hold_until; absent: none)
    {prefix}h:{host_id}       zset    ids of the sessions with a lease on the host, by expire
    {prefix}u:{index}:{id}    hash    an upload: upload_id, create, completed, urls_expire,
                                      clean_after, size, owner
    {prefix}uclean            zset    "{index}:{id}" of every upload, by clean_after
    {prefix}ubytes            hash    bytes, count: what all uploads reserve
    {prefix}ubytes:offer      hash    session id -> bytes its uploads reserve
    {prefix}ubytes:owner      hash    owner -> bytes its uploads reserve
    {prefix}broker_id         string  the broker's id (SET NX: made once)
    {prefix}token_key         string  32 random bytes keying code hashes and derived tokens
                                      (SET NX: made once, so every replica finds every code)
    {prefix}x:{key}           (any)   the ledger's entries (RedisLedger; ledger.py): rate-limit
                                      buckets (hash), guess counts, claim times, sealed retry
                                      answers; each with a Redis TTL

Every index is written by the same script as the session it points to: clearing a code hash
takes its `c:` entry away, setting the receiver's token hash adds its `t:` entry, and
`delete_ended` leaves no key of a deleted session behind (its uploads stay for the cleaner,
as on SQLite). Nothing but the ledger's entries expires by a Redis TTL: time is the broker's
clock, passed in, as on SQLite. Secrets reach this module only as hashes; nothing here logs
a key or a value. An empty code hash, receiver token hash, request id or verifier is stored
as none (the broker never makes an empty one).

Durability is the Redis server's: a broker restart loses nothing, a Redis restart keeps
what its persistence kept. With ``appendonly yes`` (``appendfsync everysec``) a killed Redis
loses no answered write and a power cut at most the last second, as with SqliteStore.

Scripts name the keys they compute (other sessions' leases, the indexes) from the prefix
rather than declaring each in KEYS, so this store is for one Redis server (or a primary with
replicas and Sentinel), not Redis Cluster. Redis must not evict: `check` warns unless
maxmemory-policy is noeviction, and a write refused for memory raises StorageFull
(RESOURCE_EXHAUSTED, STORAGE_FULL), like a full disk under SQLite. `free_bytes` is None (no
local disk), so the new-offer disk check is SQLite's only.

A connection failure, a timeout or a read-only replica (a failover) raises StoreUnavailable
(UNAVAILABLE, STORE_ERROR; the client retries). redis-py's own retries are turned off: a
script retried after a timeout may already have run once, and would then apply its write
twice (a won compare-and-set reported as stale). The pool still replaces a connection the
server closed before it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ferry.broker import leases
from ferry.broker.errors import Reason, Unavailable
from ferry.broker.ledger import MAX_TTL_S, rounded_ms
from ferry.broker.states import CONNECTING, LIVE_STATES, TRANSFERRING, Party
from ferry.broker.store import (
    CodeTaken,
    QuotaExceeded,
    SessionRecord,
    StaleRecord,
    StorageFull,
    StoreQuota,
    UploadRecord,
)
from ferry.v1 import broker_pb2

if TYPE_CHECKING:
    from ferry.broker.people import Directory

__all__ = ["DEFAULT_PREFIX", "DuplicateSession", "RedisStore", "StoreUnavailable"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "ferry:"
#: Seconds to connect, and to wait for any one answer: a Redis that hangs fails the call
#: (StoreUnavailable) after this long; the event loop serves other calls meanwhile.
CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 5.0
_MIN_VERSION = (7, 0)
_SCHEMES = ("redis", "rediss", "unix")


class StoreUnavailable(Unavailable):
    """The broker's store (Redis) cannot be reached or did not answer in time; retry later.

    The message is for the caller and names nothing of the deployment; the Redis error it
    comes from is chained (``__cause__``) for the broker's own log.
    """

    def __init__(self, message: str = "the broker's store is unavailable; try again later"):
        super().__init__(Reason.STORE_ERROR, message)


class DuplicateSession(ValueError):
    """create_session was given an id that is stored already (SQLite: IntegrityError)."""


# -- the scripts ------------------------------------------------------------------------------
# ARGV[1] is always the key prefix. Numbers come in as Python's repr (exact round trip) and
# go back as the stored strings, since Redis turns a Lua number into an integer reply.

_WRITES = "#!lua\n"
_READS = "#!lua flags=no-writes\n"
# Scripts that only delete or lower counters: they run under maxmemory too, since they are
# how a full Redis gets room back (the sweeper deletes ended sessions first).
_FREES = "#!lua flags=allow-oom\n"

_RECORD = """
local function record(prefix, id)
  local f = redis.call('HMGET', prefix .. 's:' .. id,
    'data', 'code', 'sender', 'receiver', 'request', 'version', 'verifier')
  if not f[1] then return false end
  return {id, f[1], f[2], f[3], f[4], f[5], f[6], f[7]}
end
"""

# KEYS: s:{id}. ARGV: prefix, id, data, state, version, sender, code, receiver, request,
# verifier, create, expire, update, live ("1"/"0"), recipient ('' = none). Returns 1, 0 if
# the id exists, or -1 if the code hash is held by a session that is live or expires after
# `create` (CodeTaken).
_CREATE = (
    _WRITES
    + """
local p, id = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[7] ~= '' then
  local held = redis.call('ZREVRANGE', p .. 'c:' .. ARGV[7], 0, 0)
  if #held > 0 then
    if redis.call('ZSCORE', p .. 'live', held[1]) then return -1 end
    local expire = redis.call('HGET', p .. 's:' .. held[1], 'expire')
    if expire and tonumber(expire) >= tonumber(ARGV[11]) then return -1 end
  end
end
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'state', ARGV[4], 'version', ARGV[5],
  'sender', ARGV[6], 'create', ARGV[11], 'expire', ARGV[12], 'update', ARGV[13])
local optional = {code = ARGV[7], receiver = ARGV[8], request = ARGV[9], verifier = ARGV[10]}
for name, value in pairs(optional) do
  if value ~= '' then redis.call('HSET', KEYS[1], name, value) end
end
if ARGV[7] ~= '' then redis.call('ZADD', p .. 'c:' .. ARGV[7], ARGV[11], id) end
if ARGV[9] ~= '' then redis.call('ZADD', p .. 'q:' .. ARGV[9], ARGV[11], id) end
if ARGV[15] ~= '' then redis.call('ZADD', p .. 'i:' .. ARGV[15], ARGV[11], id) end
redis.call('SET', p .. 't:' .. ARGV[6], 's:' .. id)
if ARGV[8] ~= '' then redis.call('SET', p .. 't:' .. ARGV[8], 'r:' .. id) end
if ARGV[14] == '1' then
  redis.call('ZADD', p .. 'live', ARGV[12], id)
else
  redis.call('ZADD', p .. 'ended', ARGV[13], id)
end
return 1
"""
)

# KEYS: s:{id}. ARGV: prefix, id, version (expected), data, state, code, receiver, expire,
# update, live. Returns 1, or 0 when the stored version differs (or the session is gone).
_UPDATE = (
    _WRITES
    + """
local p, id = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', KEYS[1], 'version', 'code', 'receiver', 'create')
if not cur[1] or tonumber(cur[1]) ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'data', ARGV[4], 'state', ARGV[5],
  'version', string.format('%d', tonumber(ARGV[3]) + 1), 'expire', ARGV[8], 'update', ARGV[9])
local old_code, new_code = cur[2] or '', ARGV[6]
if old_code ~= new_code then
  if old_code ~= '' then redis.call('ZREM', p .. 'c:' .. old_code, id) end
  if new_code ~= '' then
    redis.call('HSET', KEYS[1], 'code', new_code)
    redis.call('ZADD', p .. 'c:' .. new_code, cur[4], id)
  else
    redis.call('HDEL', KEYS[1], 'code')
  end
end
local old_receiver, new_receiver = cur[3] or '', ARGV[7]
if old_receiver ~= new_receiver then
  if old_receiver ~= '' then
    local key = p .. 't:' .. old_receiver
    if redis.call('GET', key) == 'r:' .. id then redis.call('DEL', key) end
  end
  if new_receiver ~= '' then
    redis.call('HSET', KEYS[1], 'receiver', new_receiver)
    redis.call('SET', p .. 't:' .. new_receiver, 'r:' .. id)
  else
    redis.call('HDEL', KEYS[1], 'receiver')
  end
end
if ARGV[10] == '1' then
  redis.call('ZREM', p .. 'ended', id)
  redis.call('ZADD', p .. 'live', ARGV[8], id)
else
  redis.call('ZREM', p .. 'live', id)
  redis.call('ZADD', p .. 'ended', ARGV[9], id)
end
return 1
"""
)

# KEYS: an index zset (c:{hash} or q:{request_id}). The newest session in it, or nil.
_NEWEST = (
    _READS
    + _RECORD
    + """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, 0)
if #ids == 0 then return false end
return record(ARGV[1], ids[1])
"""
)

# KEYS: t:{token_hash}. ARGV: prefix. {party ("s"/"r"), record...} of the token's session, or nil.
_BY_TOKEN = (
    _READS
    + _RECORD
    + """
local owner = redis.call('GET', KEYS[1])
if not owner then return false end
local party, id = string.match(owner, '^(%a):(.*)$')
local r = record(ARGV[1], id)
if not r then return false end
table.insert(r, 1, party)
return r
"""
)

# KEYS: live. ARGV: prefix, now, limit. The records due, oldest expire_time first.
_DUE = (
    _READS
    + _RECORD
    + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])) do
  local r = record(ARGV[1], id)
  if r then out[#out + 1] = r end
end
return out
"""
)

# KEYS: h:{host}, l:{id}. ARGV: prefix, id, host, first, last, count, expire, now, owner,
# hold ('' = none), max_per_owner ('' = none), CONNECTING, TRANSFERRING.
# Returns {'ok', first, last}, {'many', held}, {'full'} or {'invalid'}.
_LEASE = (
    _WRITES
    + """
local p, id, now = ARGV[1], ARGV[2], tonumber(ARGV[8])
local first, last, count = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
-- The live leases of the host but the session's own: SqliteStore's _HELD_LEASES.
local spans, mine = {}, 0
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[8], '+inf')) do
  if other ~= id then
    local l = redis.call('HMGET', p .. 'l:' .. other, 'first', 'last', 'owner', 'hold')
    if l[1] then
      local held = (not l[4]) or tonumber(l[4]) > now
      if not held then
        local state = redis.call('HGET', p .. 's:' .. other, 'state')
        held = state == ARGV[12] or state == ARGV[13]
      end
      if held then
        spans[#spans + 1] = {tonumber(l[1]), tonumber(l[2])}
        if l[3] == ARGV[9] then mine = mine + 1 end
      end
    end
  end
end
if ARGV[11] ~= '' and mine >= tonumber(ARGV[11]) then return {'many', mine} end
if not (1 <= first and first <= last and last <= 65535) or count < 1 then
  return {'invalid'}
end
-- First fit from the low end: leases.allocate.
table.sort(spans, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[2] < b[2]
end)
local candidate = first
for _, span in ipairs(spans) do
  if span[2] >= candidate then
    if span[1] - candidate >= count then break end
    candidate = math.max(candidate, span[2] + 1)
    if candidate + count - 1 > last then break end
  end
end
if candidate + count - 1 > last then return {'full'} end
local old_host = redis.call('HGET', KEYS[2], 'host')
if old_host and old_host ~= ARGV[3] then redis.call('ZREM', p .. 'h:' .. old_host, id) end
redis.call('DEL', KEYS[2])
local span = {string.format('%d', candidate), string.format('%d', candidate + count - 1)}
redis.call('HSET', KEYS[2], 'host', ARGV[3], 'first', span[1], 'last', span[2],
  'expire', ARGV[7], 'owner', ARGV[9])
if ARGV[10] ~= '' then redis.call('HSET', KEYS[2], 'hold', ARGV[10]) end
redis.call('ZADD', KEYS[1], ARGV[7], id)
return {'ok', span[1], span[2]}
"""
)

# KEYS: l:{id}. ARGV: prefix, id.
_RELEASE = (
    _FREES
    + """
local host = redis.call('HGET', KEYS[1], 'host')
if host then redis.call('ZREM', ARGV[1] .. 'h:' .. host, ARGV[2]) end
redis.call('DEL', KEYS[1])
return 1
"""
)

_UPLOAD_FIELDS = ("upload_id", "create", "completed", "urls_expire", "clean_after", "size", "owner")
_UPLOAD_LUA = "'upload_id', 'create', 'completed', 'urls_expire', 'clean_after', 'size', 'owner'"

# KEYS: u:{member}, uclean, ubytes, ubytes:offer, ubytes:owner. ARGV: prefix, session_id,
# member, upload_id, create, completed, urls_expire, clean_after, size, owner, quota ("1"/"0"),
# per_offer, per_owner, total. Returns {'quota', which, used} or the stored upload's fields.
_ADD_UPLOAD = (
    _WRITES
    + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  local size = tonumber(ARGV[9])
  if ARGV[11] == '1' then
    local checks = {{
      {{'offer', redis.call('HGET', KEYS[4], ARGV[2]), ARGV[12]}},
      {{'owner', redis.call('HGET', KEYS[5], ARGV[10]), ARGV[13]}},
      {{'total', redis.call('HGET', KEYS[3], 'bytes'), ARGV[14]}},
    }}
    for _, check in ipairs(checks) do
      local used = tonumber(check[2] or '0')
      if used + size > tonumber(check[3]) then return {{'quota', check[1], used}} end
    end
  end
  redis.call('HSET', KEYS[1], 'upload_id', ARGV[4], 'create', ARGV[5], 'completed', ARGV[6],
    'urls_expire', ARGV[7], 'clean_after', ARGV[8], 'size', ARGV[9], 'owner', ARGV[10])
  redis.call('ZADD', KEYS[2], ARGV[8], ARGV[3])
  redis.call('HINCRBY', KEYS[3], 'bytes', ARGV[9])
  redis.call('HINCRBY', KEYS[3], 'count', 1)
  redis.call('HINCRBY', KEYS[4], ARGV[2], ARGV[9])
  redis.call('HINCRBY', KEYS[5], ARGV[10], ARGV[9])
end
return redis.call('HMGET', KEYS[1], {_UPLOAD_LUA})
"""
)

# KEYS: u:{member}. ARGV: old upload_id, new upload_id. Returns 1 if replaced.
_REPLACE_UPLOAD = (
    _WRITES
    + """
local f = redis.call('HMGET', KEYS[1], 'upload_id', 'completed')
if f[1] == ARGV[1] and f[2] == '0' then
  redis.call('HSET', KEYS[1], 'upload_id', ARGV[2])
  return 1
end
return 0
"""
)

# KEYS: u:{member}. ARGV: field, value, mode ('set' or 'max'). Changes an existing upload only.
_SET_UPLOAD = (
    _WRITES
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if ARGV[3] == 'max' and tonumber(cur) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS: u:{member}, uclean. ARGV: after, member.
_DEFER_UPLOAD = (
    _WRITES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'clean_after', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""
)

# KEYS: u:{member}, uclean, ubytes, ubytes:offer, ubytes:owner. ARGV: member, session_id.
_DELETE_UPLOAD = (
    _FREES
    + """
local f = redis.call('HMGET', KEYS[1], 'size', 'owner')
if not f[1] then return 0 end
-- The size goes back as the string it was stored as: a Lua number may be formatted otherwise.
local minus = f[1] == '0' and '0' or '-' .. f[1]
local function take(key, field)
  if redis.call('HINCRBY', key, field, minus) <= 0 then redis.call('HDEL', key, field) end
end
take(KEYS[4], ARGV[2])
take(KEYS[5], f[2])
redis.call('HINCRBY', KEYS[3], 'bytes', minus)
redis.call('HINCRBY', KEYS[3], 'count', -1)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""
)

# KEYS: uclean. ARGV: prefix, now, limit, then the live states. Returns {member, fields...}
# of up to `limit` uploads whose session is final or gone, oldest clean_after first.
_TO_CLEAN = (
    _READS
    + f"""
local p, limit = ARGV[1], tonumber(ARGV[3])
local live = {{}}
for i = 4, #ARGV do live[ARGV[i]] = true end
local out, offset = {{}}, 0
while #out < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', offset, 256)
  if #batch == 0 then break end
  for _, member in ipairs(batch) do
    local colon = string.find(member, ':', 1, true)
    local state = redis.call('HGET', p .. 's:' .. string.sub(member, colon + 1), 'state')
    if not (state and live[state]) then
      local f = redis.call('HMGET', p .. 'u:' .. member, {_UPLOAD_LUA})
      if f[1] then
        out[#out + 1] = {{member, f[1], f[2], f[3], f[4], f[5], f[6], f[7]}}
        if #out >= limit then break end
      end
    end
  end
  offset = offset + #batch
end
return out
"""
)

# KEYS: ended. ARGV: prefix, before, limit. Deletes the sessions, their index entries and
# leases; returns how many.
_DELETE_ENDED = (
    _FREES
    + """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  local key = p .. 's:' .. id
  local s = redis.call('HMGET', key, 'code', 'sender', 'receiver', 'request')
  if s[1] then redis.call('ZREM', p .. 'c:' .. s[1], id) end
  if s[4] then redis.call('ZREM', p .. 'q:' .. s[4], id) end
  local tokens = {{s[2], 's:'}, {s[3], 'r:'}}
  for _, token in ipairs(tokens) do
    if token[1] and redis.call('GET', p .. 't:' .. token[1]) == token[2] .. id then
      redis.call('DEL', p .. 't:' .. token[1])
    end
  end
  local host = redis.call('HGET', p .. 'l:' .. id, 'host')
  if host then redis.call('ZREM', p .. 'h:' .. host, id) end
  redis.call('DEL', p .. 'l:' .. id, key)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""
)


# The ledger's token buckets (ledger.py: the same arithmetic as ledger.Bucket). A bucket is a
# hash of tokens and stamp that expires once it would be full again: a missing one is full.
_BUCKET = """
local burst, rate, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, stamp = burst, now
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
if b[1] then
  tokens, stamp = tonumber(b[1]), tonumber(b[2])
  if now > stamp then
    tokens = math.min(burst, tokens + (now - stamp) * rate)
    stamp = now
  end
end
"""

# KEYS: the bucket. ARGV: burst, rate, now. 1 if it holds a token, else 0.
_PEEK = _READS + _BUCKET + "return tokens >= 1 and 1 or 0\n"

# KEYS: the bucket. ARGV: burst, rate, now, cost, force ("1"/"0"), longest ttl (ms).
# 1 if it held a token, else 0; spends `cost` if it did, or anyway if forced.
_TAKE = (
    _WRITES
    + _BUCKET
    + """
local had = tokens >= 1
if had or ARGV[5] == '1' then
  tokens = tokens - tonumber(ARGV[4])
  local ms = tonumber(ARGV[6])
  if rate > 0 then ms = math.min(ms, math.ceil((burst - tokens) / rate * 1000) + 1000) end
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
    'stamp', string.format('%.17g', stamp))
  redis.call('PEXPIRE', KEYS[1], ms)
end
return had and 1 or 0
"""
)


# -- conversions ------------------------------------------------------------------------------


def _num(value: float) -> str:
    """A float as Redis and Lua read it back exactly."""
    return repr(float(value))


def _seconds(ts: Any) -> float:
    return float(ts.ToNanoseconds()) / 1e9


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _record(values: Sequence[Any]) -> SessionRecord:
    _id, data, code, sender, receiver, request, version, verifier = values
    session = broker_pb2.Session()
    session.ParseFromString(data)
    return SessionRecord(
        session=session,
        sender_token_hash=sender.decode(),
        code_hash=_text(code),
        receiver_token_hash=_text(receiver),
        request_id=_text(request),
        version=int(version),
        claim_verifier=verifier or None,
    )


def _upload(session_id: str, file_index: int, values: Sequence[Any]) -> UploadRecord:
    upload_id, create, completed, urls_expire, clean_after, size, owner = values
    return UploadRecord(
        session_id=session_id,
        file_index=file_index,
        upload_id=upload_id.decode(),
        create_s=float(create),
        completed=completed == b"1",
        urls_expire_s=float(urls_expire),
        clean_after_s=float(clean_after),
        size_bytes=int(size),
        owner=owner.decode(),
    )


def _member(session_id: str, file_index: int) -> str:
    """An upload's name in `uclean` and in its key: the index first, so the id may hold ':'."""
    return f"{file_index}:{session_id}"


def _oom(exc: ResponseError) -> bool:
    return isinstance(exc, OutOfMemoryError) or "OOM command not allowed" in str(exc)


def _os_reason(exc: BaseException | None) -> str:
    """The OS's words for the error behind `exc` ("Connection refused"), if any: the asyncio
    client's own message gives only the number (Error 111)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return ""


def describe_url(url: str) -> str:
    """`url` without its credentials and query, for logs: ``redis://host:port/db``."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisStore:
    """Store on one Redis server (database); one instance per process (per event loop: its
    connection pool belongs to the loop that first uses it) is enough.

    `client` should be made as `from_url` makes it (no retries, bounded timeouts, bytes
    replies); `prefix` is put before every key. Nothing connects before the first call:
    `check` is the first one a broker makes.
    """

    def __init__(
        self, client: redis.asyncio.Redis, prefix: str = DEFAULT_PREFIX, where: str = "Redis"
    ) -> None:
        if not prefix:
            raise ValueError("a RedisStore needs a key prefix")
        self._redis = client
        self._prefix = prefix
        self._where = where
        self._live = sorted(str(int(s)) for s in LIVE_STATES)
        script = client.register_script
        self._create = script(_CREATE)
        self._update = script(_UPDATE)
        self._newest = script(_NEWEST)
        self._due = script(_DUE)
        self._by_token = script(_BY_TOKEN)
        self._lease = script(_LEASE)
        self._release = script(_RELEASE)
        self._add_upload = script(_ADD_UPLOAD)
        self._replace_upload = script(_REPLACE_UPLOAD)
        self._set_upload = script(_SET_UPLOAD)
        self._defer_upload = script(_DEFER_UPLOAD)
        self._delete_upload = script(_DELETE_UPLOAD)
        self._to_clean = script(_TO_CLEAN)
        self._delete_ended = script(_DELETE_ENDED)
        self._ledger = RedisLedger(self)
        self._directory: Directory | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> RedisStore:
        """A store on ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS) or
        ``unix:///path/to/socket?db=N``; options in the URL's query win over the arguments.

        Does not connect (ValueError for a URL of another scheme): await `check` before use.
        """
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in _SCHEMES:
            raise ValueError(f"not a Redis URL (redis://, rediss:// or unix://): {scheme}://")
        client = redis.asyncio.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, prefix, describe_url(url))

    async def check(self) -> None:
        """Connect once to check the server: raise StoreUnavailable if it cannot be reached,
        RuntimeError if it is older than Redis 7.0; log a warning if it may evict keys."""
        where = self._where
        try:
            async with self._errors():
                info = await self._redis.info()
        except StoreUnavailable as exc:  # at start-up: say where and why, for the operator
            cause = exc.__cause__
            message = f"cannot reach the Redis store at {where}: {cause}"
            why = _os_reason(cause)
            if why and why.lower() not in message.lower():
                message += f" ({why})"
            raise StoreUnavailable(message) from cause
        version = str(info.get("redis_version", "0"))
        if tuple(int(part) for part in version.split(".")[:2]) < _MIN_VERSION:
            raise RuntimeError(f"the broker's store needs Redis 7.0 or later; {where} is {version}")
        policy = str(info.get("maxmemory_policy", "noeviction"))
        if policy != "noeviction":
            log.warning(
                "Redis at %s has maxmemory-policy %s: it may evict sessions and leases;"
                " set it to noeviction",
                where,
                policy,
            )
        log.info("store: Redis %s at %s, key prefix %r", version, where, self._prefix)

    #: Told the seconds of each round trip to Redis (the broker's metrics); None: nobody.
    on_round_trip: Callable[[float], None] | None = None

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        """Redis's failures as the store's: StoreUnavailable, StorageFull. Every call to
        Redis runs inside it, so it also times them for `on_round_trip`."""
        started = time.perf_counter()
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError) as exc:
            # ReadOnlyError: a replica answered, as during a failover (Sentinel).
            raise StoreUnavailable() from exc
        except ResponseError as exc:
            if _oom(exc):
                raise StorageFull() from None
            raise
        finally:
            if self.on_round_trip is not None:
                self.on_round_trip(time.perf_counter() - started)

    def _key(self, *parts: str) -> str:
        return self._prefix + "".join(parts)

    # -- sessions -----------------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        s = record.session
        sid = record.session_id
        async with self._errors():
            created = await self._create(
                keys=[self._key("s:", sid)],
                args=[
                    self._prefix,
                    sid,
                    s.SerializeToString(deterministic=True),
                    int(s.state),
                    record.version,
                    record.sender_token_hash,
                    record.code_hash or "",
                    record.receiver_token_hash or "",
                    record.request_id or "",
                    record.claim_verifier or b"",
                    _num(_seconds(s.create_time)),
                    _num(record.expire_s),
                    _num(_seconds(s.update_time)),
                    "1" if s.state in LIVE_STATES else "0",
                    s.person.recipient_user,
                ],
            )
        if created == -1:
            raise CodeTaken
        if not created:
            raise DuplicateSession(f"session {sid} exists already")

    async def get_session(self, session_id: str) -> SessionRecord | None:
        fields = ("data", "code", "sender", "receiver", "request", "version", "verifier")
        async with self._errors():
            values = await self._redis.hmget(self._key("s:", session_id), fields)
        return None if values[0] is None else _record([session_id, *values])

    async def find_by_code_hash(self, code_hash: str) -> SessionRecord | None:
        return await self._find(self._key("c:", code_hash))

    async def find_by_request_id(self, request_id: str) -> SessionRecord | None:
        return await self._find(self._key("q:", request_id))

    async def _find(self, index: str) -> SessionRecord | None:
        async with self._errors():
            found = await self._newest(keys=[index], args=[self._prefix])
        return None if not found else _record(found)

    async def session_by_token_hash(self, token_hash: str) -> tuple[SessionRecord, Party] | None:
        async with self._errors():
            found = await self._by_token(keys=[self._key("t:", token_hash)], args=[self._prefix])
        if not found:
            return None
        party = Party.SENDER if found[0] == b"s" else Party.RECEIVER
        return _record(found[1:]), party

    async def update_session(self, record: SessionRecord) -> SessionRecord:
        s = record.session
        sid = record.session_id
        async with self._errors():
            updated = await self._update(
                keys=[self._key("s:", sid)],
                args=[
                    self._prefix,
                    sid,
                    record.version,
                    s.SerializeToString(deterministic=True),
                    int(s.state),
                    record.code_hash or "",
                    record.receiver_token_hash or "",
                    _num(record.expire_s),
                    _num(_seconds(s.update_time)),
                    "1" if s.state in LIVE_STATES else "0",
                ],
            )
        if not updated:
            raise StaleRecord(f"session {sid} changed concurrently")
        return dataclasses.replace(record, version=record.version + 1)

    async def due_for_expiry(self, now: float, limit: int) -> list[SessionRecord]:
        async with self._errors():
            rows = await self._due(keys=[self._key("live")], args=[self._prefix, _num(now), limit])
        return [_record(row) for row in rows]

    # -- leases -------------------------------------------------------------------------------

    async def lease_ports(
        self,
        host_id: str,
        allowed: leases.Span,
        count: int,
        session_id: str,
        expire_s: float,
        now: float,
        *,
        owner: str = "",
        hold_until: float | None = None,
        max_per_owner: int | None = None,
    ) -> leases.Span:
        async with self._errors():
            reply = await self._lease(
                keys=[self._key("h:", host_id), self._key("l:", session_id)],
                args=[
                    self._prefix,
                    session_id,
                    host_id,
                    int(allowed[0]),
                    int(allowed[1]),
                    int(count),
                    _num(expire_s),
                    _num(now),
                    owner,
                    "" if hold_until is None else _num(hold_until),
                    "" if max_per_owner is None else int(max_per_owner),
                    int(CONNECTING),
                    int(TRANSFERRING),
                ],
            )
        outcome = reply[0]
        if outcome == b"ok":
            return int(reply[1]), int(reply[2])
        if outcome == b"many":
            raise leases.TooManyLeases(
                f"the receiving address holds {int(reply[1])} port leases on this sender's host"
                f" already (at most {max_per_owner}): let a transfer connect or end,"
                " or cancel one, then try again"
            )
        if outcome == b"invalid":
            leases.allocate(allowed, count, ())  # raises its ValueError
        first, last = allowed
        raise leases.NoPortsAvailable(
            f"no {count} free consecutive ports left in {first}-{last} on this host"
        )

    async def release_lease(self, session_id: str) -> None:
        async with self._errors():
            await self._release(keys=[self._key("l:", session_id)], args=[self._prefix, session_id])

    # -- uploads ------------------------------------------------------------------------------

    def _upload_keys(self, session_id: str, file_index: int) -> list[str]:
        return [
            self._key("u:", _member(session_id, file_index)),
            self._key("uclean"),
            self._key("ubytes"),
            self._key("ubytes:offer"),
            self._key("ubytes:owner"),
        ]

    async def add_upload(
        self, record: UploadRecord, quota: StoreQuota | None = None
    ) -> UploadRecord:
        limits = (quota.per_offer, quota.per_owner, quota.total) if quota else (0, 0, 0)
        async with self._errors():
            reply = await self._add_upload(
                keys=self._upload_keys(record.session_id, record.file_index),
                args=[
                    self._prefix,
                    record.session_id,
                    _member(record.session_id, record.file_index),
                    record.upload_id,
                    _num(record.create_s),
                    "1" if record.completed else "0",
                    _num(record.urls_expire_s),
                    _num(record.clean_after_s),
                    int(record.size_bytes),
                    record.owner,
                    "1" if quota else "0",
                    *limits,
                ],
            )
        if reply[0] == b"quota":
            who = {
                b"offer": ("this offer", limits[0]),
                b"owner": ("this sender's address", limits[1]),
                b"total": ("the whole broker", limits[2]),
            }
            name, limit = who[reply[1]]
            raise QuotaExceeded(
                f"the object store would hold {int(reply[2]) + record.size_bytes} bytes for"
                f" {name}, over the broker's limit of {limit}"
            )
        return _upload(record.session_id, record.file_index, reply)

    async def store_usage(self) -> tuple[int, int]:
        async with self._errors():
            used, count = await self._redis.hmget(self._key("ubytes"), ("bytes", "count"))
        return int(used or 0), int(count or 0)

    async def get_upload(self, session_id: str, file_index: int) -> UploadRecord | None:
        key = self._key("u:", _member(session_id, file_index))
        async with self._errors():
            values = await self._redis.hmget(key, _UPLOAD_FIELDS)
        return None if values[0] is None else _upload(session_id, file_index, values)

    async def replace_upload(
        self, session_id: str, file_index: int, old_upload_id: str, new_upload_id: str
    ) -> bool:
        key = self._key("u:", _member(session_id, file_index))
        async with self._errors():
            done = await self._replace_upload(keys=[key], args=[old_upload_id, new_upload_id])
        return bool(done)

    async def complete_upload(self, session_id: str, file_index: int) -> None:
        key = self._key("u:", _member(session_id, file_index))
        async with self._errors():
            await self._set_upload(keys=[key], args=["completed", "1", "set"])

    async def extend_upload_urls(self, session_id: str, file_index: int, expire_s: float) -> None:
        key = self._key("u:", _member(session_id, file_index))
        async with self._errors():
            await self._set_upload(keys=[key], args=["urls_expire", _num(expire_s), "max"])

    async def uploads_to_clean(self, now: float, limit: int) -> list[UploadRecord]:
        async with self._errors():
            rows = await self._to_clean(
                keys=[self._key("uclean")], args=[self._prefix, _num(now), limit, *self._live]
            )
        out = []
        for member, *values in rows:
            index, _, session_id = member.decode().partition(":")
            out.append(_upload(session_id, int(index), values))
        return out

    async def defer_upload_cleanup(self, session_id: str, file_index: int, after_s: float) -> None:
        member = _member(session_id, file_index)
        async with self._errors():
            await self._defer_upload(
                keys=[self._key("u:", member), self._key("uclean")], args=[_num(after_s), member]
            )

    async def delete_upload(self, session_id: str, file_index: int) -> None:
        async with self._errors():
            await self._delete_upload(
                keys=self._upload_keys(session_id, file_index),
                args=[_member(session_id, file_index), session_id],
            )

    async def free_bytes(self) -> int | None:
        return None  # no local disk: Redis's memory is its own (maxmemory -> StorageFull)

    # -- housekeeping -------------------------------------------------------------------------

    async def delete_ended(self, before_s: float, limit: int) -> int:
        async with self._errors():
            deleted = await self._delete_ended(
                keys=[self._key("ended")], args=[self._prefix, _num(before_s), limit]
            )
        return int(deleted)

    async def broker_id(self) -> str:
        key = self._key("broker_id")
        async with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, uuid.uuid4().hex, nx=True)
            pipe.get(key)
            _, value = await pipe.execute()
        return cast(bytes, value).decode()

    async def token_key(self) -> bytes | None:
        key = self._key("token_key")
        async with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.set(key, secrets.token_bytes(32), nx=True)  # the first replica's wins
            pipe.get(key)
            _, value = await pipe.execute()
        return cast(bytes, value)

    def ledger(self) -> RedisLedger:
        return self._ledger

    async def close(self) -> None:
        await self._redis.aclose()

    async def count_sessions_by_state(self) -> dict[str, int]:
        """Only "live" and "ended": the store keeps no per-state index, and reading every
        session's state at each scrape would cost O(sessions). Two ZCARDs, one round trip."""
        async with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._key("live"))
            pipe.zcard(self._key("ended"))
            live, ended = await pipe.execute()
        return {"live": int(live), "ended": int(ended)}

    async def count_uploads_in_flight(self) -> int | None:
        """None: no index tells completed uploads from the others (store_usage() counts
        them all, cheaply)."""
        return None

    async def offers_to(self, recipient: str, now: float, limit: int) -> list[SessionRecord]:
        ids = (await self._inbox(recipient, now))[:limit]
        fields = ("data", "code", "sender", "receiver", "request", "version", "verifier")
        async with self._errors(), self._redis.pipeline(transaction=False) as pipe:
            for sid in ids:
                pipe.hmget(self._key("s:", sid), fields)
            rows = await pipe.execute()
        # A session deleted between the two reads is left out.
        return [_record([sid, *row]) for sid, row in zip(ids, rows, strict=True) if row[0]]

    async def count_offers_to(self, recipient: str, now: float) -> int:
        return len(await self._inbox(recipient, now))

    async def _inbox(self, recipient: str, now: float) -> list[str]:
        """The ids of the inbox index's sessions still offered and not expired, oldest first,
        read by state and expiry only (no session's data). The others (ended, or deleted
        after their retention) leave the index here, so it holds the person's offers of the
        last offer TTL and retention at most."""
        index = self._key("i:", recipient)
        async with self._errors():
            members = await self._redis.zrange(index, 0, -1)
            ids = [cast(bytes, member).decode() for member in members]
            async with self._redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hmget(self._key("s:", sid), ("state", "expire"))
                rows = await pipe.execute()
        live: list[str] = []
        gone: list[str] = []
        for sid, (state, expire) in zip(ids, rows, strict=True):
            if state is None or int(state) != broker_pb2.Session.STATE_OFFERED:
                gone.append(sid)
            elif float(expire) > now:
                live.append(sid)
        if gone:
            async with self._errors():
                await self._redis.zrem(index, *gone)
        return live

    def directory(self) -> Directory:
        if self._directory is None:  # made on first use: people.py imports this module
            from ferry.broker.people import RedisDirectory

            self._directory = RedisDirectory(self._redis, self._prefix)
        return self._directory


class RedisLedger:
    """The Ledger (ledger.py) of the replicas on one Redis: keys ``{prefix}x:{key}``.

    Unlike the store's keys these expire by Redis's TTL: what they hold (an allowance, a
    count, a sealed retry answer) only matters for a while, and no sweep then needs to find
    them. Writes past maxmemory raise StorageFull, like the store's.
    """

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._redis = store._redis
        self._prefix = store._prefix + "x:"
        self._peek = self._redis.register_script(_PEEK)
        self._take = self._redis.register_script(_TAKE)

    async def has_token(self, key: str, burst: float, rate: float, now: float) -> bool:
        async with self._store._errors():
            held = await self._peek(
                keys=[self._prefix + key], args=[_num(burst), _num(rate), _num(now)]
            )
        return bool(held)

    async def take(
        self,
        key: str,
        burst: float,
        rate: float,
        now: float,
        cost: float = 1.0,
        force: bool = False,
    ) -> bool:
        args = [_num(burst), _num(rate), _num(now), _num(cost), "1" if force else "0"]
        async with self._store._errors():
            had = await self._take(keys=[self._prefix + key], args=[*args, rounded_ms(MAX_TTL_S)])
        return bool(had)

    async def count(self, key: str, ttl_s: float) -> int:
        name = self._prefix + key
        async with self._store._errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(name)
            pipe.pexpire(name, rounded_ms(min(ttl_s, MAX_TTL_S)), nx=True)
            value, _ = await pipe.execute()
        return int(value)

    async def first(self, key: str, now: float, ttl_s: float) -> float:
        name = self._prefix + key
        async with self._store._errors(), self._redis.pipeline(transaction=True) as pipe:
            pipe.set(name, _num(now), nx=True, px=rounded_ms(min(ttl_s, MAX_TTL_S)))
            pipe.get(name)
            _, value = await pipe.execute()
        return float(value)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        async with self._store._errors():
            await self._redis.set(self._prefix + key, value, px=rounded_ms(min(ttl_s, MAX_TTL_S)))

    async def get(self, key: str) -> bytes | None:
        async with self._store._errors():
            return cast("bytes | None", await self._redis.get(self._prefix + key))

    async def forget(self, key: str) -> None:
        async with self._store._errors():
            await self._redis.delete(self._prefix + key)
