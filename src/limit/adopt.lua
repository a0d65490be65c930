-- sluice: the vendor reports fewer tokens left than this record believes; adopt its figure for
-- the rest of the window, so every replica follows it (after quota.lua). Mirrors `decide::adopt`.
--
-- KEYS[1]  the quota's state
-- ARGV[1]  "now" in microseconds, or 0 for Redis TIME
-- ARGV[2..8] the rule (7 values, see quota.lua; the cost is ignored)
-- ARGV[9]  what the vendor says is left
-- ARGV[10] a nonce naming the log members this adds
-- Returns  1 when the record changed, else 0

local now = redis_now(ARGV[1])
local r = read_rule(KEYS[1], 1, now)
local remaining = math.max(0, tonumber(ARGV[9]))
local nonce = ARGV[10] or fmt(now)

if r.kind == 0 then
  local target = now + r.tolerance - (remaining - 1) * r.interval
  if target <= math.max(r.tat or now, now) then return 0 end
  r.tat = target
  redis.call('SET', r.key, fmt(r.tat), 'PX', math.ceil((r.tat - now) / 1000) + 1000)
  return 1
elseif r.kind == 1 then
  remaining = math.min(remaining, r.limit)
  local missing = (r.limit - remaining) - count_in(r, window_index(r, now))
  if missing <= 0 then return 0 end
  charge(r, now, missing, now, nonce)
  return 1
end
remaining = math.min(remaining, r.limit)
local believed = r.limit - count_after(r, now - r.span)
local missing = believed - remaining
if missing <= 0 then return 0 end
local at = oldest(r, now)
if at == nil then at = now - (now % r.width) end
roll_add(r, at, missing, nonce)
keep_until(r, newest(r) + r.span, now)
return 1
