-- Tollgate GCRA, the arithmetic of gcra.rs, for a batch of requests; runs
-- after time.lua. A key stores its theoretical arrival time and expires
-- when that time passes, since a key at or before now decides like a
-- missing one.
--
-- ARGV[1], ARGV[2]: now (time.lua).
-- ARGV[3]: how many key names follow in ARGV; 0 when they are the KEYS.
-- (On Redis Cluster a batch's keys span slots of one node: undeclared,
-- with the allow-cross-slot-keys flag.) Then the number of groups
-- (requests), then per group: its number of checks, then per check: t (ns
-- per unit), capacity (t * burst, ns), cost, enforce (1 or 0), lease (units
-- to reserve beyond the cost, as many as fit, when the group is charged).
-- Key names: one per check, in order.
--
-- A group is decided all-or-nothing: when an enforced check denies, no
-- check of the group is charged. Groups are decided in order, each seeing
-- what the ones before it charged. Within a group, checks of one key
-- (policies of one name) charge it one after the other, as in MemoryStore:
-- a later check starts from what the earlier ones would charge, and only
-- the key's last check of the group may lease (so each charge's reported
-- state stays what a refund of it needs).
--
-- Returns now (seconds, nanoseconds), then per group: allowed (1/0), then
-- per check: allowed, remaining, reset_after (ns), retry_after (ns), units
-- leased. remaining and reset_after are the request's own, before the
-- lease; now + reset_after + leased * t is the state the charge left, for a
-- refund to undo.

-- Key names: KEYS from 1, or ARGV from 4.
local names, key = KEYS, 1
local named = tonumber(ARGV[3])
if named > 0 then
  names, key = ARGV, 4
end
local arg = 4 + named
local groups = tonumber(ARGV[arg])
arg = arg + 1

-- Every key is read before any is written: a key this node does not own
-- (its slot is being moved) fails the script here, before anything is
-- charged, so a call charges all it was sent or nothing. OFF: each key's
-- stored state as ns after now (0 when absent or past), kept current as
-- groups charge.
local OFF = {}
do
  local count = named
  if named == 0 then
    count = #KEYS
  end
  for i = key, key + count - 1 do
    local k = names[i]
    if OFF[k] == nil then
      local base = 0
      local stored = redis.call('GET', k)
      if stored then
        base = offset(stored)
        if base < 0 then
          base = 0
        end
      end
      OFF[k] = base
    end
  end
end

local out = { now_s, now_ns }
-- Per check of the current group, reused across groups: no table per check.
local K, T, CAP, CHARGE, BASE, NEW, OK, LEASE = {}, {}, {}, {}, {}, {}, {}, {}
for _ = 1, groups do
  local n = tonumber(ARGV[arg])
  arg = arg + 1
  local group_allowed = true
  -- This group's running value per key, and each key's last check.
  local RUN, LAST = {}, {}
  for c = 1, n do
    local t = tonumber(ARGV[arg])
    local cap = tonumber(ARGV[arg + 1])
    local charge = t * tonumber(ARGV[arg + 2])
    local enforce = ARGV[arg + 3] == '1'
    local lease = tonumber(ARGV[arg + 4])
    arg = arg + 5
    local k = names[key]
    key = key + 1
    local base = RUN[k]
    if base == nil then
      base = OFF[k]
    end
    local new = base + charge
    local allowed = new <= cap
    if allowed then
      RUN[k] = new
    else
      RUN[k] = base
    end
    LAST[k] = c
    if enforce and not allowed then
      group_allowed = false
    end
    K[c], T[c], CAP[c], CHARGE[c], BASE[c], NEW[c], OK[c], LEASE[c] =
      k, t, cap, charge, base, new, allowed, lease
  end
  out[#out + 1] = group_allowed and 1 or 0
  for c = 1, n do
    local t, cap, base, new = T[c], CAP[c], BASE[c], NEW[c]
    if OK[c] and group_allowed then
      -- Charged, with as much of the lease as fits. The key lives exactly
      -- as long as its state matters.
      local leased = 0
      if LAST[K[c]] == c then
        leased = math.min(LEASE[c], math.floor((cap - new) / t))
      end
      local stored_new = new + leased * t
      local ms = math.ceil(stored_new / 1000000)
      if ms < 1 then
        ms = 1
      end
      redis.call('SET', K[c], encode(stored_new), 'PX', ms)
      OFF[K[c]] = stored_new
      out[#out + 1] = 1
      out[#out + 1] = math.floor((cap - new) / t)
      out[#out + 1] = new
      out[#out + 1] = 0
      out[#out + 1] = leased
    elseif OK[c] then
      -- Would pass, but the group was denied: reported as it stands.
      out[#out + 1] = 1
      out[#out + 1] = math.floor((cap - base) / t)
      out[#out + 1] = base
      out[#out + 1] = 0
      out[#out + 1] = 0
    else
      out[#out + 1] = 0
      if cap > base then
        out[#out + 1] = math.floor((cap - base) / t)
      else
        out[#out + 1] = 0
      end
      out[#out + 1] = base
      if CHARGE[c] > cap then
        out[#out + 1] = cap
      else
        out[#out + 1] = new - cap
      end
      out[#out + 1] = 0
    end
  end
end
return out
