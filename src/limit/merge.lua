-- sluice: fold what this replica admitted on its local share while Redis was away into the
-- shared record, so the first window after recovery is not a double one (after quota.lua).
--
-- KEYS[1]  the quota's state
-- ARGV[1]  "now" in microseconds, or 0 for Redis TIME
-- ARGV[2..8] the rule (7 values, see quota.lua; the cost is ignored)
-- ARGV[9]  a nonce naming the log members this adds
-- ARGV[10..] pairs: time (us), tokens. Smooth: one pair, the local TAT and 0.
-- Returns  the tokens added

local now = redis_now(ARGV[1])
local r = read_rule(KEYS[1], 1, now)
local nonce = ARGV[9] or fmt(now)
local added = 0

if r.kind == 0 then
  -- The local share's debt (how far its TAT ran ahead of now) is added to the shared one.
  local debt = math.max(0, tonumber(ARGV[10] or '0') - now)
  if debt <= 0 then return 0 end
  r.tat = math.max(r.tat or now, now) + debt
  redis.call('SET', r.key, fmt(r.tat), 'PX', math.ceil((r.tat - now) / 1000) + 1000)
  return math.floor(debt / r.interval)
end

for j = 10, #ARGV - 1, 2 do
  local at = tonumber(ARGV[j])
  local tokens = tonumber(ARGV[j + 1])
  if r.kind == 1 then
    -- Only counts of the current or a later window still matter.
    if at >= r.bounds[window_index(r, now)] and tokens > 0 then
      charge(r, at, tokens, now, nonce)
      added = added + tokens
    end
  elseif at + (r.w or 1) - 1 > now - r.span and tokens > 0 then
    roll_add(r, at, tokens, nonce .. ':' .. j)
    added = added + tokens
  end
end
if r.kind == 2 and added > 0 then keep_until(r, newest(r) + r.span, now) end
return added
