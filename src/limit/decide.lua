-- sluice: one request's quota decision, all quotas at once, all or nothing (after quota.lua).
-- A line-for-line mirror of `decide` in src/limit/decide.rs; keep them in step.
--
-- KEYS[i]  state of quota i (see quota.lua). All keys share one hash tag.
-- KEYS[n+1] the vendor pause of this upstream and scope: "<until>" in microseconds, with an
--          "o" after it when the vendor was failing (a 5xx with Retry-After), when set.
-- ARGV[1]  longest wait the caller accepts (microseconds)
-- ARGV[2]  "now" in microseconds, or 0 to use Redis TIME (tests pin it; production never does)
-- ARGV[3]  number of quotas n, then 7 values per quota (see quota.lua), then
--          a lease request (Redis only, see redis.rs "Leases"): extra tokens wanted beyond the
--          cost, and how long the lease lives (us); then a nonce naming this call's log members.
-- Returns  {allowed (1|0|2 paused), wait or retry-after (us), limiting quota (0-based; for a
--           pause, 1 when it is an outage), remaining_1, reset_in_1, ..., remaining_n, reset_in_n}
--          and, when allowed, the tokens charged per quota (cost + leased extra)

local now = redis_now(ARGV[2])
local max_wait = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local NEVER = 1125899906842624 -- 2^50 us, about 35 years
local nonce = ARGV[3 + n * 7 + 3] or fmt(now)

local rules = {}
for i = 1, n do
  rules[i] = read_rule(KEYS[i], 3 + (i - 1) * 7, now)
end

local function standings(at, out)
  for i = 1, n do standing(rules[i], at, out) end
  return out
end

-- A vendor pause holds everything, before any token is taken.
local pause_raw = redis.call('GET', KEYS[n + 1])
local paused_until = nil
local outage = 0
if pause_raw then
  paused_until = tonumber(string.match(pause_raw, '^%d+'))
  if string.find(pause_raw, 'o', 1, true) then outage = 1 end
end
if paused_until and paused_until > now then
  return standings(now, { 2, paused_until - now, outage })
end

-- Just after a pause (its key outlives it by a second), paced buckets restart empty at its end:
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
    local at = earliest(rules[i], send_at)
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
  if earliest(rules[i], send_at) ~= send_at then stable = false end
end
if (not stable) or send_at - now > max_wait then
  return standings(now, { 0, send_at - now, limiting })
end

-- A lease: extra tokens this replica spends locally, so that busy scopes need a round trip per
-- lease instead of per request. Only for a request that goes now, only out of headroom that
-- leaves as much again for the other replicas, and never past the end of a fixed window. A
-- rolling window records leased tokens at the end of the lease's life: they count from now
-- until the last moment they could be spent has left the window.
local extra = tonumber(ARGV[3 + n * 7 + 1] or '0') or 0
local lease_us = tonumber(ARGV[3 + n * 7 + 2] or '0') or 0
if extra > 0 and n > 0 and send_at == now then
  for i = 1, n do
    local r = rules[i]
    local headroom
    if r.kind == 0 then
      local tat = math.max(r.tat or now, now) + r.cost * r.interval
      headroom = math.floor((now + r.tolerance - tat) / r.interval) + 1
    elseif r.kind == 1 then
      local j = window_index(r, now)
      if r.bounds[j + 1] - now <= lease_us then
        headroom = 0
      else
        headroom = r.limit - count_in(r, j) - r.cost
      end
    else
      headroom = r.limit - count_after(r, now - r.span) - r.cost
    end
    extra = math.min(extra, math.floor(headroom / 2))
  end
  if extra < 0 then extra = 0 end
else
  extra = 0
end

for i = 1, n do
  local r = rules[i]
  if r.kind == 2 then
    charge(r, send_at, r.cost, now, nonce)
    if extra > 0 then charge(r, now + lease_us, extra, now, nonce .. 'L') end
  else
    charge(r, send_at, r.cost + extra, now, nonce)
  end
end
local reply = standings(send_at, { 1, send_at - now, limiting })
if n > 0 then reply[#reply + 1] = rules[1].cost + extra end
return reply
