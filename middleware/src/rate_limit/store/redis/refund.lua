-- Gives back what a charge of the GCRA script took, for a request another
-- node denied. Runs on the node that charged.
--
-- ARGV[1], ARGV[2]: now as seconds and nanoseconds, or "" to use TIME.
-- ARGV[3]: number of refunds, then per refund: key name, charge (ns), and
-- the state the charge left (seconds, nanoseconds).
--
-- Only the part of the charge still ahead of now is given back, and never
-- more than the charge: a later charge by someone else stacked on ours
-- stays, and a charge made after ours had drained (the state had fallen
-- behind now) is not touched, since then nothing of ours is left.
--
-- Returns the number of keys changed.

local now_s, now_ns
if ARGV[1] ~= '' then
  now_s = tonumber(ARGV[1])
  now_ns = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now_s = tonumber(t[1])
  now_ns = tonumber(t[2]) * 1000
end

local BILLION = 1000000000

local function encode(off)
  local ns = now_ns + off
  local carry = math.floor(ns / BILLION)
  return string.format('%d:%d', now_s + carry, ns - carry * BILLION)
end

local changed = 0
local arg = 4
for _ = 1, tonumber(ARGV[3]) do
  local k = ARGV[arg]
  local charge = tonumber(ARGV[arg + 1])
  local left = (tonumber(ARGV[arg + 2]) - now_s) * BILLION + (tonumber(ARGV[arg + 3]) - now_ns)
  arg = arg + 4
  local give = math.min(charge, left)
  local stored = redis.call('GET', k)
  if stored and give > 0 then
    local colon = string.find(stored, ':', 1, true)
    local current = (tonumber(string.sub(stored, 1, colon - 1)) - now_s) * BILLION
      + (tonumber(string.sub(stored, colon + 1)) - now_ns)
    local new = current - give
    if new <= 0 then
      redis.call('DEL', k)
    else
      local ms = math.ceil(new / 1000000)
      redis.call('SET', k, encode(new), 'PX', ms)
    end
    changed = changed + 1
  end
end
return changed
