"""Lua scripts: every Redis state transition that touches more than one key.

A request's `attempts` field is a fencing token: each assignment to a worker bumps
it, and every later write by a worker must quote it. A worker that was declared
dead but is still running (a zombie) cannot write tokens into a request that now
runs elsewhere.

Every script that changes a group's queue also appends the change to the changes stream
(Keys.changes; controller/waiting_view.py reads it): entry ids 0-1, 0-2, ... with no gaps,
so a reader sees when entries it had not read were trimmed away.
"""

# Entries the changes stream keeps (approximately): at 2,000 changes/s, a minute of them.
CHANGES_MAXLEN = 200_000

# op 's': appended to the group's tail (submitted), 'r': put back at its head (requeued),
# 'x': left the queue (assigned, cancelled, failed).
_CHANGE = f"""
local function changed(KC, op, gid, rid)
  redis.call('XADD', KC, 'MAXLEN', '~', {CHANGES_MAXLEN}, '0-*', 'o', op, 'g', gid, 'q', rid)
end
"""

# Admission and acceptance in one step, so that several controllers share the limits.
# KEYS[1] - request hash, KEYS[2] - group hash, KEYS[3] - group queue, KEYS[4] - groups zset,
# KEYS[5] - open-group pointer, KEYS[6] - idempotency key, KEYS[7] - unfinished set,
# KEYS[8] - queued counters hash, KEYS[9] - the tenant's tokens-this-minute counter,
# KEYS[10] - the changes stream
# ARGV[1] - request id, ARGV[2] - group id, ARGV[3] - now, ARGV[4] - "1" if the group is new
# (a group whose hash is missing is opened too),
# ARGV[5] - "1" if an idempotency key is used, ARGV[6] - model, ARGV[7] - slo class,
# ARGV[8] - idempotency ttl seconds, ARGV[9] - payload fingerprint, ARGV[10] - tenant,
# ARGV[11] - cost (prompt + max tokens), ARGV[12..19] - limits, 0 = none: class requests,
# class tokens, tenant requests, tenant tokens, all requests, all tokens, tenant tokens per
# minute, ARGV[19] - the request hash's fields as a JSON object of strings (one argument, not
# 2 x 19: a client packs each argument of a command separately, and that was the largest
# cost of a submission in the controller)
# return 1 when accepted (the smallest reply: the controller parses one per submission),
# {0, earlier request id, its fingerprint} for a known idempotency key, {2, limit name, amount queued, limit} when an admission limit refuses it
SUBMIT = _CHANGE + """
redis.call('ZSCORE', KEYS[4], '-')  -- a controller-only key first: a worker's ACL stops here
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[6])
  if existing then
    local sep = string.find(existing, '|', 1, true)
    if sep then return {0, string.sub(existing, 1, sep - 1), string.sub(existing, sep + 1)} end
    return {0, existing, ''}
  end
end
local cls, tenant, cost = ARGV[7], ARGV[10], tonumber(ARGV[11])
local fields = {'c|' .. cls .. '|n', 'c|' .. cls .. '|t', 'u|' .. tenant .. '|n', 'u|' .. tenant .. '|t',
                'all|n', 'all|t'}
local have = redis.call('HMGET', KEYS[8], unpack(fields))
local names = {'class requests', 'class tokens', 'tenant requests', 'tenant tokens', 'queued requests',
               'queued tokens'}
for i = 1, 6 do
  local limit = tonumber(ARGV[11 + i])
  local cur = tonumber(have[i] or '0')
  local add = 1
  if i % 2 == 0 then add = cost end
  if limit > 0 and cur + add > limit then return {2, names[i], tostring(cur), tostring(limit)} end
end
local tpm = tonumber(ARGV[18])
if tpm > 0 then
  local used = tonumber(redis.call('GET', KEYS[9]) or '0')
  if used + cost > tpm then return {2, 'tenant tokens per minute', tostring(used), tostring(tpm)} end
  redis.call('INCRBY', KEYS[9], cost)
  redis.call('EXPIRE', KEYS[9], 120)
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[6], ARGV[1] .. '|' .. ARGV[9], 'EX', tonumber(ARGV[8]))
end
local flat = {}
for k, v in pairs(cjson.decode(ARGV[19])) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', KEYS[1], unpack(flat))
if ARGV[4] == '1' or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[2], 'model', ARGV[6], 'slo_class', ARGV[7], 'created_at', ARGV[3], 'size', 0)
  redis.call('SET', KEYS[5], ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'size', 1)
redis.call('RPUSH', KEYS[3], ARGV[1])
changed(KEYS[10], 's', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], 'NX', redis.call('HGET', KEYS[2], 'created_at'), ARGV[2])
redis.call('SADD', KEYS[7], ARGV[1])
for i = 1, 6 do
  local add = 1
  if i % 2 == 0 then add = cost end
  redis.call('HINCRBY', KEYS[8], fields[i], add)
end
return 1
"""

# Queued counters of a request leaving (sign -1) or re-entering (sign 1) the queue; used
# inline by ASSIGN, REQUEUE and FINISH_EARLY. KQ - the counters hash key, REQ - request hash.
_COUNT = """
local function count_queued(KQ, REQ, sign)
  local m = redis.call('HMGET', REQ, 'slo_class', 'tenant', 'cost')
  local cost = tonumber(m[3] or '0') * sign
  local t = m[2] or ''
  redis.call('HINCRBY', KQ, 'c|' .. m[1] .. '|n', sign)
  redis.call('HINCRBY', KQ, 'c|' .. m[1] .. '|t', cost)
  redis.call('HINCRBY', KQ, 'u|' .. t .. '|n', sign)
  redis.call('HINCRBY', KQ, 'u|' .. t .. '|t', cost)
  redis.call('HINCRBY', KQ, 'all|n', sign)
  redis.call('HINCRBY', KQ, 'all|t', cost)
end
"""

# Only the leading controller plans and assigns: a write quotes the lease value it holds,
# and a controller that lost the lease (paused, partitioned) has its write refused.
_FENCE = """
local function fenced(KL, holder)
  return holder ~= '' and redis.call('GET', KL) ~= holder
end
"""

# KEYS[1] - request hash, KEYS[2] - group queue, KEYS[3] - worker running hash,
# KEYS[4] - queued counters hash, KEYS[5] - leader lease, KEYS[6] - the changes stream
# ARGV[1] - request id, ARGV[2] - worker id, ARGV[3] - now, ARGV[4] - lease value held ("" = none),
# ARGV[5] - group id
# return the new attempt number, 0 when the request is no longer waiting, -1 when fenced
ASSIGN = _COUNT + _FENCE + _CHANGE + """
redis.call('EXISTS', KEYS[2])  -- a controller-only key first: a worker's ACL stops here
if fenced(KEYS[5], ARGV[4]) then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('LREM', KEYS[2], 1, ARGV[1]) == 0 then return 0 end
changed(KEYS[6], 'x', ARGV[5], ARGV[1])
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker_id', ARGV[2], 'started_at', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], attempt)
count_queued(KEYS[4], KEYS[1], -1)
return attempt
"""

# Tokens of one worker iteration, many requests at once (one round trip per iteration).
# KEYS[1] - lengths hash, KEYS[2] - worker running hash, KEYS[3] - class stats hash,
# KEYS[4] - unfinished set, KEYS[5] - latency log stream (capped; TTFT of first tokens, TPOT of
# finishes), then per event i (0-based):
# KEYS[6+3i] request hash, KEYS[7+3i] ids string, KEYS[8+3i] stream
# ARGV[1] - now, ARGV[2] - number of events, ARGV[3] - seconds to keep a finished request,
# then per event 7 values: request id, attempt, index, token id, text, finished "1"/"0", reason
# return "<request id>|<attempt>" for each event refused because the request no longer runs
# under that attempt on this worker (the worker drops that attempt); duplicate indexes are skipped
# silently. The worker's running hash (KEYS[2]) must list the request under the attempt: a
# worker's Redis ACL user reaches only its own running hash, so it cannot write for others.
APPEND_TOKENS = """
local now = ARGV[1]
local n = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
local refused = {}
for i = 0, n - 1 do
  local a = 4 + i * 7
  local rid, attempt, index = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local tok, text, fin, reason = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  local kreq, kids, kstream = KEYS[6 + i * 3], KEYS[7 + i * 3], KEYS[8 + i * 3]
  local st = redis.call('HMGET', kreq, 'status', 'attempts', 'generated', 'model', 'slo_class',
                        'arrival', 'ttft_slo', 'first_token_at', 'length_band')
  local mine = redis.call('HGET', KEYS[2], rid) == attempt
  if mine and (st[1] == 'running' or st[1] == 'swapped') and st[2] == attempt and tonumber(st[3]) == index then
    redis.call('APPEND', kids, tok .. ',')
    redis.call('HSET', kreq, 'generated', index + 1)
    local first = st[8]
    if (not first) or first == '' then
      first = now
      redis.call('HSET', kreq, 'first_token_at', now)
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'c', st[5], 'm', st[4], 't', tonumber(now) - tonumber(st[6]))
    end
    redis.call('XADD', kstream, '0-' .. (index + 1), 'i', index, 't', tok, 'x', text, 'f', fin, 'r', reason)
    if fin == '1' then
      redis.call('HSET', kreq, 'status', 'finished', 'finish_reason', reason, 'finish_at', now)
      redis.call('HDEL', KEYS[2], rid)
      redis.call('SREM', KEYS[4], rid)
      local lk = st[4] .. '|' .. st[5] .. '|' .. (st[9] or '0')  -- the request's length band
      redis.call('HINCRBY', KEYS[1], lk .. '|n', 1)
      redis.call('HINCRBYFLOAT', KEYS[1], lk .. '|sum', index + 1)
      redis.call('HINCRBYFLOAT', KEYS[1], lk .. '|sumsq', (index + 1) * (index + 1))
      redis.call('HINCRBY', KEYS[3], st[5] .. '|finished', 1)
      if index > 0 then  -- time per output token after the first, for the TPOT histogram
        redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'c', st[5], 'm', st[4], 'p',
                   (tonumber(now) - tonumber(first)) / index)
      end
      if tonumber(first) - tonumber(st[6]) <= tonumber(st[7]) then
        redis.call('HINCRBY', KEYS[3], st[5] .. '|met', 1)
      end
      if keep > 0 then
        redis.call('EXPIRE', kreq, keep)
        redis.call('EXPIRE', kids, keep)
        redis.call('EXPIRE', kstream, keep)
      end
    end
  elseif (not mine) or st[2] ~= attempt or not ((st[1] == 'running') or (st[1] == 'swapped')) then
    refused[#refused + 1] = rid .. '|' .. attempt
  end
end
return refused
"""

# Hand a request back to its group (eviction, worker failure, drain). Its generated
# tokens stay; the next attempt continues after them.
# KEYS[1] - request hash, KEYS[2] - worker running hash, KEYS[3] - group hash,
# KEYS[4] - group queue, KEYS[5] - groups zset, KEYS[6] - queued counters hash,
# KEYS[7] - the changes stream
# ARGV[1] - request id, ARGV[2] - worker id it must be on ("" = any), ARGV[3] - now,
# ARGV[4] - group id
# return 1 when requeued, 0 when it was not running there
REQUEUE = _COUNT + _CHANGE + """
redis.call('EXISTS', KEYS[5])  -- a controller-only key first: a worker's ACL stops here
local st = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'model', 'slo_class', 'arrival')
redis.call('HDEL', KEYS[2], ARGV[1])
if (st[1] ~= 'running' and st[1] ~= 'swapped') or (ARGV[2] ~= '' and st[2] ~= ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'worker_id', '')
redis.call('HINCRBY', KEYS[1], 'requeues', 1)
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[3], 'model', st[3], 'slo_class', st[4], 'created_at', st[5], 'size', 1)
end
redis.call('PERSIST', KEYS[3])
redis.call('LPUSH', KEYS[4], ARGV[1])
changed(KEYS[7], 'r', ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[5], 'NX', redis.call('HGET', KEYS[3], 'created_at'), ARGV[4])
count_queued(KEYS[6], KEYS[1], 1)
return 1
"""

# Mark a request swapped / running again (KV swap), checking the worker still owns it.
# KEYS[1] - request hash, KEYS[2] - the worker's running hash
# ARGV[1] - worker id, ARGV[2] - new status ("swapped"/"running"), ARGV[3] - request id
# return 1 when changed
SET_SWAP_STATE = """
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 0 then return 0 end
local st = redis.call('HMGET', KEYS[1], 'status', 'worker_id')
if (st[1] ~= 'running' and st[1] ~= 'swapped') or st[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
return 1
"""

# End a request that will produce no more tokens: cancelled by its client, or failed. A
# running request also leaves its worker's running hash, so its batch slot is free again.
# KEYS[1] - request hash, KEYS[2] - group queue, KEYS[3] - stream, KEYS[4] - unfinished set,
# KEYS[5] - ids string, KEYS[6] - queued counters hash, KEYS[7] - running hash of the worker,
# KEYS[8] - the changes stream
# ARGV[1] - new status (cancelled|failed), ARGV[2] - now, ARGV[3] - reason / error text,
# ARGV[4] - seconds to keep the request, ARGV[5] - attempt that failed ("" = any),
# ARGV[6] - the worker whose running hash KEYS[7] is, ARGV[7] - worker that must hold it ("" = any)
# return {previous status, worker id}, {} when it had already ended (or is not that
# worker's), {"retry"} when it now runs on a worker other than ARGV[6] (read again)
FINISH_EARLY = _COUNT + _CHANGE + """
redis.call('EXISTS', KEYS[2])  -- a controller-only key first: a worker's ACL stops here
local st = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'generated', 'attempts')
if not st[1] then return {} end
if st[1] == 'finished' or st[1] == 'cancelled' or st[1] == 'failed' then return {} end
if ARGV[5] ~= '' and st[4] ~= ARGV[5] then return {} end
local on_worker = st[1] == 'running' or st[1] == 'swapped'
if ARGV[7] ~= '' and ((not on_worker) or st[2] ~= ARGV[7]) then return {} end
if on_worker and st[2] ~= ARGV[6] then return {'retry'} end
if st[1] == 'queued' then
  local rid = redis.call('HGET', KEYS[1], 'id')
  if redis.call('LREM', KEYS[2], 1, rid) > 0 then
    changed(KEYS[8], 'x', redis.call('HGET', KEYS[1], 'group_id'), rid)
  end
  count_queued(KEYS[6], KEYS[1], -1)
end
if on_worker then redis.call('HDEL', KEYS[7], redis.call('HGET', KEYS[1], 'id')) end
local reason = 'cancelled'
if ARGV[1] == 'failed' then reason = 'error' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finish_reason', reason, 'finish_at', ARGV[2], 'error', ARGV[3])
local index = tonumber(st[3])
redis.call('XADD', KEYS[3], '0-' .. (index + 1), 'i', index, 't', '', 'x', '', 'f', '1', 'r', reason)
redis.call('SREM', KEYS[4], redis.call('HGET', KEYS[1], 'id'))
local keep = tonumber(ARGV[4])
if keep > 0 then
  redis.call('EXPIRE', KEYS[1], keep)
  redis.call('EXPIRE', KEYS[3], keep)
  redis.call('EXPIRE', KEYS[5], keep)
end
return {st[1], st[2]}
"""

# The plan, written only by the controller holding the leader lease.
# KEYS[1] - plan key, KEYS[2] - leader lease, then the virtual-queue keys of the workers
# ARGV[1] - lease value held ("" = none), ARGV[2] - plan JSON, ARGV[3] - a JSON list with
# each worker's group ids, in the order of KEYS[3..] (one argument: a client packs each
# argument separately, and at depth the queues hold thousands of groups)
# return 1 when written, -1 when fenced
SAVE_PLAN = _FENCE + """
if fenced(KEYS[2], ARGV[1]) then return -1 end
local queues = cjson.decode(ARGV[3])
for i = 1, #KEYS - 2 do
  local key = KEYS[2 + i]
  redis.call('DEL', key)
  local q = queues[i]
  for a = 1, #q, 4000 do  -- unpack has a stack limit
    redis.call('RPUSH', key, unpack(q, a, math.min(#q, a + 3999)))
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# Readers for the controller's tick. Each returns a few long strings instead of many small
# replies: a client parses one bulk string far faster than thousands of array elements
# (XRANGE of 2,000 entries took 186 ms to parse in redis-py, its reply as one string ~1 ms).

# The changes after a sequence number (Keys.changes; see _CHANGE).
# KEYS[1] - the changes stream; ARGV[1] - after this sequence number, ARGV[2] - at most this many
# return "seq op group request" lines joined by newlines ("" when none)
READ_CHANGES = """
local rows = redis.call('XRANGE', KEYS[1], '(0-' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local out = {}
for i, e in ipairs(rows) do
  local f = e[2]
  out[i] = string.sub(e[1], 3) .. ' ' .. f[2] .. ' ' .. f[4] .. ' ' .. f[6]
end
return table.concat(out, '\\n')
"""

# Groups and their queues. KEYS - group hash and group queue of each group, in pairs
# return per group {model, slo class, created_at or false, the waiting request ids joined by spaces}
READ_GROUPS = """
local out = {}
for i = 1, #KEYS, 2 do
  local h = redis.call('HMGET', KEYS[i], 'model', 'slo_class', 'created_at')
  out[#out + 1] = {h[1] or '', h[2] or '', h[3] or '', table.concat(redis.call('LRANGE', KEYS[i + 1], 0, -1), ' ')}
end
return out
"""

# What workers run, with each request's progress. KEYS[1..ARGV[1]] - running hashes of the
# workers, then the request hashes of ARGV[2..] (request ids, for the request hashes only)
# return per worker "request attempt request attempt ..." and, if request hashes are
# given, one more string: "generated first_token_at" per request, joined by newlines
READ_RUNNING = """
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  out[i] = table.concat(redis.call('HGETALL', KEYS[i]), ' ')
end
if #KEYS > n then
  local p = {}
  for i = n + 1, #KEYS do
    local h = redis.call('HMGET', KEYS[i], 'generated', 'first_token_at')
    p[#p + 1] = (h[1] or '0') .. ' ' .. (h[2] or '')
  end
  out[n + 1] = table.concat(p, '\\n')
end
return out
"""
