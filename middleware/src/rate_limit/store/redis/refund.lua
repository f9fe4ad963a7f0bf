-- Gives back what a charge of the GCRA script took, for a request another
-- node denied. Runs on the node that charged.
--
-- Runs after time.lua. ARGV[1], ARGV[2]: now (time.lua).
-- ARGV[3]: number of refunds, then per refund: key name, charge (ns), and
-- the state the charge left (seconds, nanoseconds).
--
-- Only the part of the charge still ahead of now is given back, and never
-- more than the charge: a later charge by someone else stacked on ours
-- stays, and a charge made after ours had drained (the state had fallen
-- behind now) is not touched, since then nothing of ours is left.
--
-- Returns the number of keys changed.

-- Every key is read before any is written (as in the GCRA script): a key
-- this node no longer owns fails the call before anything is given back.
local stored_of = {}
local n = tonumber(ARGV[3])
for i = 0, n - 1 do
  local k = ARGV[4 + 4 * i]
  if stored_of[k] == nil then
    stored_of[k] = redis.call('GET', k)
  end
end

local changed = 0
local arg = 4
for _ = 1, n do
  local k = ARGV[arg]
  local charge = tonumber(ARGV[arg + 1])
  local left = (tonumber(ARGV[arg + 2]) - now_s) * BILLION + (tonumber(ARGV[arg + 3]) - now_ns)
  arg = arg + 4
  local give = math.min(charge, left)
  local stored = stored_of[k]
  if stored and give > 0 then
    local new = offset(stored) - give
    if new <= 0 then
      redis.call('DEL', k)
      stored_of[k] = false
    else
      local ms = math.ceil(new / 1000000)
      local encoded = encode(new)
      redis.call('SET', k, encoded, 'PX', ms)
      stored_of[k] = encoded
    end
    changed = changed + 1
  end
end
return changed
