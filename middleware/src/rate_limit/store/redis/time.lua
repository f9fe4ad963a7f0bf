-- Time for Tollgate's scripts; put before each of them.
--
-- Time is (seconds, nanoseconds) so nanosecond arithmetic stays exact in
-- Lua's doubles: every quantity a script computes is an offset from now,
-- bounded by a quota's capacity (far below 2^53 ns). A key stores its
-- theoretical arrival time as "seconds:nanoseconds".
--
-- ARGV[1], ARGV[2]: now as seconds and nanoseconds, or "" to use TIME.

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

-- A stored time as ns after now (negative when past).
local function offset(stored)
  local colon = string.find(stored, ':', 1, true)
  if not colon then
    return 0
  end
  return (tonumber(string.sub(stored, 1, colon - 1)) - now_s) * BILLION
    + (tonumber(string.sub(stored, colon + 1)) - now_ns)
end

-- now + off (off >= 0) as "seconds:nanoseconds".
local function encode(off)
  local ns = now_ns + off
  local carry = math.floor(ns / BILLION)
  return string.format('%d:%d', now_s + carry, ns - carry * BILLION)
end

