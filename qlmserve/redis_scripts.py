"""Lua scripts: every Redis state transition that touches more than one key.

A request's `attempts` field is a fencing token: each assignment to a worker bumps
it, and every later write by a worker must quote it. A worker that was declared
dead but is still running (a zombie) cannot write tokens into a request that now
runs elsewhere.
"""

# KEYS[1] - request hash, KEYS[2] - group hash, KEYS[3] - group queue, KEYS[4] - groups zset,
# KEYS[5] - open-group pointer, KEYS[6] - idempotency key, KEYS[7] - unfinished set
# ARGV[1] - request id, ARGV[2] - group id, ARGV[3] - now, ARGV[4] - "1" if the group is new,
# ARGV[5] - "1" if an idempotency key is used, ARGV[6] - model, ARGV[7] - slo class,
# ARGV[8] - idempotency ttl seconds, ARGV[9..] - request hash field/value pairs
# return {1, request id} when accepted, {0, earlier request id} for a duplicate key
SUBMIT = """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return {0, existing} end
  redis.call('SET', KEYS[6], ARGV[1], 'EX', tonumber(ARGV[8]))
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[2], 'model', ARGV[6], 'slo_class', ARGV[7], 'created_at', ARGV[3], 'size', 0)
  redis.call('SET', KEYS[5], ARGV[2])
end
redis.call('HINCRBY', KEYS[2], 'size', 1)
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], 'NX', redis.call('HGET', KEYS[2], 'created_at'), ARGV[2])
redis.call('SADD', KEYS[7], ARGV[1])
return {1, ARGV[1]}
"""

# KEYS[1] - request hash, KEYS[2] - group queue, KEYS[3] - worker running hash
# ARGV[1] - request id, ARGV[2] - worker id, ARGV[3] - now
# return the new attempt number, or 0 when the request is no longer waiting
ASSIGN = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
if redis.call('LREM', KEYS[2], 1, ARGV[1]) == 0 then return 0 end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker_id', ARGV[2], 'started_at', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], attempt)
return attempt
"""

# Tokens of one worker iteration, many requests at once (one round trip per iteration).
# KEYS[1] - lengths hash, KEYS[2] - worker running hash, KEYS[3] - class stats hash,
# KEYS[4] - unfinished set, KEYS[5] - TTFT log stream (capped), then per event i (0-based):
# KEYS[6+3i] request hash, KEYS[7+3i] ids string, KEYS[8+3i] stream
# ARGV[1] - now, ARGV[2] - number of events, ARGV[3] - seconds to keep a finished request,
# then per event 7 values: request id, attempt, index, token id, text, finished "1"/"0", reason
# return the ids of requests whose events were refused because the request no longer runs
# under that attempt (the worker drops them); duplicate indexes are skipped silently
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
                        'arrival', 'ttft_slo', 'first_token_at')
  if (st[1] == 'running' or st[1] == 'swapped') and st[2] == attempt and tonumber(st[3]) == index then
    redis.call('APPEND', kids, tok .. ',')
    redis.call('HSET', kreq, 'generated', index + 1)
    local first = st[8]
    if (not first) or first == '' then
      first = now
      redis.call('HSET', kreq, 'first_token_at', now)
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'c', st[5], 't', tonumber(now) - tonumber(st[6]))
    end
    redis.call('XADD', kstream, '0-' .. (index + 1), 'i', index, 't', tok, 'x', text, 'f', fin, 'r', reason)
    if fin == '1' then
      redis.call('HSET', kreq, 'status', 'finished', 'finish_reason', reason, 'finish_at', now)
      redis.call('HDEL', KEYS[2], rid)
      redis.call('SREM', KEYS[4], rid)
      local lk = st[4] .. '|' .. st[5]
      redis.call('HINCRBY', KEYS[1], lk .. '|n', 1)
      redis.call('HINCRBYFLOAT', KEYS[1], lk .. '|sum', index + 1)
      redis.call('HINCRBYFLOAT', KEYS[1], lk .. '|sumsq', (index + 1) * (index + 1))
      redis.call('HINCRBY', KEYS[3], st[5] .. '|finished', 1)
      if tonumber(first) - tonumber(st[6]) <= tonumber(st[7]) then
        redis.call('HINCRBY', KEYS[3], st[5] .. '|met', 1)
      end
      if keep > 0 then
        redis.call('EXPIRE', kreq, keep)
        redis.call('EXPIRE', kids, keep)
        redis.call('EXPIRE', kstream, keep)
      end
    end
  elseif st[2] ~= attempt or not ((st[1] == 'running') or (st[1] == 'swapped')) then
    refused[#refused + 1] = rid
  end
end
return refused
"""

# Hand a request back to its group (eviction, worker failure, drain). Its generated
# tokens stay; the next attempt continues after them.
# KEYS[1] - request hash, KEYS[2] - worker running hash, KEYS[3] - group hash,
# KEYS[4] - group queue, KEYS[5] - groups zset
# ARGV[1] - request id, ARGV[2] - worker id it must be on ("" = any), ARGV[3] - now,
# ARGV[4] - group id
# return 1 when requeued, 0 when it was not running there
REQUEUE = """
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
redis.call('ZADD', KEYS[5], 'NX', redis.call('HGET', KEYS[3], 'created_at'), ARGV[4])
return 1
"""

# Mark a request swapped / running again (KV swap), checking the worker still owns it.
# KEYS[1] - request hash; ARGV[1] - worker id, ARGV[2] - new status ("swapped"/"running")
# return 1 when changed
SET_SWAP_STATE = """
local st = redis.call('HMGET', KEYS[1], 'status', 'worker_id')
if (st[1] ~= 'running' and st[1] ~= 'swapped') or st[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
return 1
"""

# End a request that will produce no more tokens: cancelled by its client, or failed.
# KEYS[1] - request hash, KEYS[2] - group queue, KEYS[3] - stream, KEYS[4] - unfinished set,
# KEYS[5] - ids string
# ARGV[1] - new status (cancelled|failed), ARGV[2] - now, ARGV[3] - reason / error text,
# ARGV[4] - seconds to keep the request, ARGV[5] - attempt that failed ("" = any)
# return {previous status, worker id}, or {} when it had already ended
FINISH_EARLY = """
local st = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'generated', 'attempts')
if not st[1] then return {} end
if st[1] == 'finished' or st[1] == 'cancelled' or st[1] == 'failed' then return {} end
if ARGV[5] ~= '' and st[4] ~= ARGV[5] then return {} end
redis.call('LREM', KEYS[2], 1, redis.call('HGET', KEYS[1], 'id'))
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
