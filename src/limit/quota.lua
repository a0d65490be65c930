-- sluice: the quota maths shared by decide.lua, adopt.lua and merge.lua (prepended to each).
-- A line-for-line mirror of src/limit/decide.rs, rolling.rs, gcra.rs and window.rs (read their
-- module docs for the maths); keep them in step. Numbers are microseconds since the epoch: Lua
-- numbers are doubles, exact for integers below 2^53, and every number written back to Redis is
-- formatted with %.0f so none is ever rounded.
--
-- A rule is read from 7 ARGV values: kind, cost, then
--   kind 0 smooth (GCRA): interval, tolerance, -, -, -
--   kind 1 fixed:        limit, start0, start1, start2, start3 (four consecutive window starts)
--   kind 2 rolling:      limit, span (per + margin), width, -, -
-- Rolling state: width 1 is an exact log, a sorted set with one member per token (score = its
-- time); a larger width keeps counters in a hash {bucket start -> tokens, w -> width}.

local function fmt(x)
  return string.format('%.0f', x)
end

local function redis_now(override)
  local now = tonumber(override)
  if now == nil or now == 0 then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now
end

-- Reads the rule starting after ARGV[o] for KEYS[key], with its state (lazily for logs).
local function read_rule(key, o, now)
  local r = { key = key, kind = tonumber(ARGV[o + 1]), cost = tonumber(ARGV[o + 2]) }
  if r.kind == 0 then
    r.interval = tonumber(ARGV[o + 3])
    r.tolerance = tonumber(ARGV[o + 4])
    r.tat = tonumber(redis.call('GET', key) or nil)
  elseif r.kind == 1 then
    r.limit = tonumber(ARGV[o + 3])
    r.starts = { ARGV[o + 4], ARGV[o + 5], ARGV[o + 6], ARGV[o + 7] }
    r.bounds = { tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5]), tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7]) }
    r.counts = {}
  else
    r.limit = tonumber(ARGV[o + 3])
    r.span = tonumber(ARGV[o + 4])
    r.width = tonumber(ARGV[o + 5])
    if r.width == 1 then
      -- Tokens at or before now - span can never count again.
      redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - r.span))
    else
      local flat = redis.call('HGETALL', key)
      local w = r.width
      local entries = {}
      for j = 1, #flat, 2 do
        if flat[j] == 'w' then
          w = math.max(w, tonumber(flat[j + 1]))
        else
          entries[#entries + 1] = { tonumber(flat[j]), tonumber(flat[j + 1]) }
        end
      end
      table.sort(entries, function(a, b) return a[1] < b[1] end)
      local keep = {}
      for _, e in ipairs(entries) do
        if e[1] + w - 1 > now - r.span then
          keep[#keep + 1] = e
        else
          redis.call('HDEL', key, fmt(e[1]))
        end
      end
      if #keep == 0 then w = r.width end
      r.w = w
      r.entries = keep
    end
  end
  return r
end

-- === fixed windows ===

local function window_index(r, at)
  for j = 3, 1, -1 do
    if r.bounds[j] <= at then return j end
  end
  return 1
end

local function count_in(r, j)
  local start = r.starts[j]
  local c = r.counts[start]
  if c == nil then
    c = tonumber(redis.call('HGET', r.key, start) or nil) or 0
    r.counts[start] = c
  end
  return c
end

-- === rolling windows ===

-- Tokens whose latest possible time is after x.
local function count_after(r, x)
  if r.width == 1 then
    return redis.call('ZCOUNT', r.key, '(' .. fmt(x), '+inf')
  end
  local total = 0
  for j = #r.entries, 1, -1 do
    if r.entries[j][1] + r.w - 1 <= x then break end
    total = total + r.entries[j][2]
  end
  return total
end

-- Latest possible time of the newest entry, or nil.
local function newest(r)
  if r.width == 1 then
    local top = redis.call('ZREVRANGE', r.key, 0, 0, 'WITHSCORES')
    if #top == 0 then return nil end
    return tonumber(top[2])
  end
  local last = r.entries[#r.entries]
  if last == nil then return nil end
  return last[1] + r.w - 1
end

-- Start of the oldest entry still counted at now, or nil.
local function oldest(r, now)
  if r.width == 1 then
    local first = redis.call('ZRANGEBYSCORE', r.key, '(' .. fmt(now - r.span), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #first == 0 then return nil end
    return tonumber(first[2])
  end
  for _, e in ipairs(r.entries) do
    if e[1] + r.w - 1 > now - r.span then return e[1] end
  end
  return nil
end

-- Adds tokens at time at (unique members from nonce for the log).
local function roll_add(r, at, tokens, nonce)
  if tokens <= 0 then return end
  if r.width == 1 then
    local args = {}
    for k = 1, tokens do
      args[#args + 1] = fmt(at)
      args[#args + 1] = nonce .. ':' .. k
      if #args >= 200 or k == tokens then
        redis.call('ZADD', r.key, unpack(args))
        args = {}
      end
    end
  else
    local start = at - (at % r.width)
    local found = false
    for _, e in ipairs(r.entries) do
      if e[1] == start then
        e[2] = e[2] + tokens
        found = true
      end
    end
    if not found then
      r.entries[#r.entries + 1] = { start, tokens }
      table.sort(r.entries, function(a, b) return a[1] < b[1] end)
    end
    redis.call('HINCRBY', r.key, fmt(start), tokens)
    redis.call('HSET', r.key, 'w', fmt(r.w))
  end
end

-- === every shape ===

local function earliest(r, at)
  if r.kind == 0 then
    if (r.cost - 1) * r.interval > r.tolerance then return nil end
    local tat = r.tat or at
    return math.max(at, tat + (r.cost - 1) * r.interval - r.tolerance)
  elseif r.kind == 1 then
    if r.cost > r.limit then return nil end
    for j = window_index(r, at), 3 do
      if count_in(r, j) + r.cost <= r.limit then return math.max(at, r.bounds[j]) end
    end
    return nil
  end
  if r.cost > r.limit then return nil end
  local room = r.limit - r.cost
  if r.width == 1 then
    if count_after(r, at - r.span) <= room then return at end
    local nth = redis.call('ZREVRANGE', r.key, room, room, 'WITHSCORES')
    return math.max(at, tonumber(nth[2]) + r.span)
  end
  local total = 0
  for j = #r.entries, 1, -1 do
    local latest = r.entries[j][1] + r.w - 1
    if latest <= at - r.span then break end
    total = total + r.entries[j][2]
    if total > room then return math.max(at, latest + r.span) end
  end
  return at
end

-- Appends remaining and reset_in of r at `at` to out.
local function standing(r, at, out)
  local remaining, reset_in
  if r.kind == 0 then
    local tat = math.max(r.tat or at, at)
    remaining = math.floor((at + r.tolerance - tat) / r.interval) + 1
    reset_in = tat - at
  elseif r.kind == 1 then
    local j = window_index(r, at)
    remaining = r.limit - count_in(r, j)
    reset_in = r.bounds[j + 1] - at
  else
    local used = count_after(r, at - r.span)
    remaining = r.limit - used
    reset_in = 0
    if used > 0 then reset_in = math.max(0, newest(r) + r.span - at) end
  end
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = reset_in
  return out
end

-- Keeps the key until its state can no longer matter (plus a second), never shortening it.
local function keep_until(r, expires, now)
  local ttl_ms = math.ceil((expires - now) / 1000) + 1000
  local current = redis.call('PTTL', r.key)
  if current < ttl_ms then redis.call('PEXPIRE', r.key, ttl_ms) end
end

-- Charges `tokens` at `at`; the rolling log's members are named from nonce.
local function charge(r, at, tokens, now, nonce)
  if r.kind == 0 then
    r.tat = math.max(r.tat or at, at) + tokens * r.interval
    -- Once TAT has passed the bucket is full again, which is what a missing key means.
    redis.call('SET', r.key, fmt(r.tat), 'PX', math.ceil((r.tat - now) / 1000) + 1000)
  elseif r.kind == 1 then
    local j = window_index(r, at)
    local c = count_in(r, j) + tokens
    r.counts[r.starts[j]] = c
    redis.call('HSET', r.key, r.starts[j], c)
    -- Windows that ended before now are over; the current one stays even when j is the next.
    for k = 1, window_index(r, now) - 1 do redis.call('HDEL', r.key, r.starts[k]) end
    -- Forgotten when the newest window it counts in ends.
    local last = j
    for k = 3, 1, -1 do
      if k > last and (tonumber(redis.call('HGET', r.key, r.starts[k]) or '0') or 0) > 0 then last = k end
    end
    keep_until(r, r.bounds[last + 1], now)
  else
    roll_add(r, at, tokens, nonce)
    keep_until(r, newest(r) + r.span, now)
  end
end
