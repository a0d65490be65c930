-- sluice: one request's quota decision, all quotas at once, all or nothing.
-- A line-for-line mirror of src/limit/gcra.rs (read its module doc for the maths); keep them in step.
--
-- KEYS[i]  state of quota i: a string (the TAT, microseconds) for rolling windows,
--          a hash {window start -> count} for fixed windows. All keys share one hash tag.
-- KEYS[n+1] the vendor pause of this upstream and scope: "until" in microseconds, when set.
-- ARGV[1]  longest wait the caller accepts (microseconds)
-- ARGV[2]  "now" in microseconds, or 0 to use Redis TIME (tests pin it; production never does)
-- ARGV[3]  number of quotas n, then 7 values per quota:
--          kind (0 rolling, 1 fixed), cost, then
--          rolling: interval, tolerance, -, -, -
--          fixed:   limit, start0, start1, start2, start3 (four consecutive window starts)
--          then, optionally, a lease request (Redis only, see redis.rs "Leases"):
--          extra tokens wanted beyond the cost, and how long the lease lives (us)
-- Returns  {allowed (1|0|2 paused), wait or retry-after (us), limiting quota (0-based),
--           remaining_1, reset_in_1, ..., remaining_n, reset_in_n}
--          and, when allowed, the tokens charged per quota (cost + leased extra)

local now = tonumber(ARGV[2])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local max_wait = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local NEVER = 1125899906842624 -- 2^50 us, about 35 years

local rules = {}
for i = 1, n do
  local o = 3 + (i - 1) * 7
  local r = { kind = tonumber(ARGV[o + 1]), cost = tonumber(ARGV[o + 2]) }
  if r.kind == 0 then
    r.interval = tonumber(ARGV[o + 3])
    r.tolerance = tonumber(ARGV[o + 4])
    r.tat = tonumber(redis.call('GET', KEYS[i]) or nil)
  else
    r.limit = tonumber(ARGV[o + 3])
    r.starts = { ARGV[o + 4], ARGV[o + 5], ARGV[o + 6], ARGV[o + 7] }
    r.bounds = { tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5]), tonumber(ARGV[o + 6]), tonumber(ARGV[o + 7]) }
    r.counts = {}
  end
  rules[i] = r
end

local function window_index(r, at)
  for j = 3, 1, -1 do
    if r.bounds[j] <= at then return j end
  end
  return 1
end

local function count_in(i, r, j)
  local start = r.starts[j]
  local c = r.counts[start]
  if c == nil then
    c = tonumber(redis.call('HGET', KEYS[i], start) or nil) or 0
    r.counts[start] = c
  end
  return c
end

local function earliest(i, r, at)
  if r.kind == 0 then
    if (r.cost - 1) * r.interval > r.tolerance then return nil end
    local tat = r.tat or at
    return math.max(at, tat + (r.cost - 1) * r.interval - r.tolerance)
  end
  if r.cost > r.limit then return nil end
  for j = window_index(r, at), 3 do
    if count_in(i, r, j) + r.cost <= r.limit then return math.max(at, r.bounds[j]) end
  end
  return nil
end

local function standings(at, out)
  for i = 1, n do
    local r = rules[i]
    if r.kind == 0 then
      local tat = math.max(r.tat or at, at)
      local remaining = math.floor((at + r.tolerance - tat) / r.interval) + 1
      if remaining < 0 then remaining = 0 end
      out[#out + 1] = remaining
      out[#out + 1] = tat - at
    else
      local j = window_index(r, at)
      local remaining = r.limit - count_in(i, r, j)
      if remaining < 0 then remaining = 0 end
      out[#out + 1] = remaining
      out[#out + 1] = r.bounds[j + 1] - at
    end
  end
  return out
end

-- A vendor pause holds everything, before any token is taken.
local paused_until = tonumber(redis.call('GET', KEYS[n + 1]) or nil)
if paused_until and paused_until > now then
  return standings(now, { 2, paused_until - now, 0 })
end

-- Just after a pause (its key outlives it by a second), the buckets restart empty at its end:
-- held requests go at the bucket's rate, not as one burst into a vendor that just said no.
if paused_until then
  for i = 1, n do
    local r = rules[i]
    if r.kind == 0 then r.tat = math.max(r.tat or 0, paused_until + r.tolerance) end
  end
end

local send_at = now
local limiting = 0
for _ = 1, 4 do
  local latest = send_at
  for i = 1, n do
    local at = earliest(i, rules[i], send_at)
    if at == nil then return standings(now, { 0, NEVER, i - 1 }) end
    if at > latest then
      latest = at
      limiting = i - 1
    end
  end
  if latest == send_at then break end
  send_at = latest
end

local stable = true
for i = 1, n do
  if earliest(i, rules[i], send_at) ~= send_at then stable = false end
end
if (not stable) or send_at - now > max_wait then
  return standings(now, { 0, send_at - now, limiting })
end

-- A lease: extra tokens this replica spends locally, so that busy scopes need a round trip per
-- lease instead of per request. Only for a request that goes now, only out of headroom that
-- leaves as much again for the other replicas, and never past the end of a fixed window.
local extra = tonumber(ARGV[3 + n * 7 + 1] or '0') or 0
local lease_us = tonumber(ARGV[3 + n * 7 + 2] or '0') or 0
if extra > 0 and n > 0 and send_at == now then
  for i = 1, n do
    local r = rules[i]
    local headroom
    if r.kind == 0 then
      local tat = math.max(r.tat or now, now) + r.cost * r.interval
      headroom = math.floor((now + r.tolerance - tat) / r.interval) + 1
    else
      local j = window_index(r, now)
      if r.bounds[j + 1] - now <= lease_us then
        headroom = 0
      else
        headroom = r.limit - count_in(i, r, j) - r.cost
      end
    end
    extra = math.min(extra, math.floor(headroom / 2))
  end
  if extra < 0 then extra = 0 end
else
  extra = 0
end

for i = 1, n do
  local r = rules[i]
  if r.kind == 0 then
    r.tat = math.max(r.tat or send_at, send_at) + (r.cost + extra) * r.interval
    -- Once TAT has passed the bucket is full again, which is what a missing key means.
    local ttl_ms = math.ceil((r.tat - now) / 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.0f', r.tat), 'PX', ttl_ms)
  else
    local j = window_index(r, send_at)
    local c = count_in(i, r, j) + r.cost + extra
    r.counts[r.starts[j]] = c
    redis.call('HSET', KEYS[i], r.starts[j], c)
    -- Windows that ended before now are over; the current one stays even when j is the next.
    for k = 1, window_index(r, now) - 1 do redis.call('HDEL', KEYS[i], r.starts[k]) end
    redis.call('PEXPIRE', KEYS[i], math.ceil((r.bounds[4] - now) / 1000) + 1000)
  end
end
local reply = standings(send_at, { 1, send_at - now, limiting })
if n > 0 then reply[#reply + 1] = rules[1].cost + extra end
return reply
