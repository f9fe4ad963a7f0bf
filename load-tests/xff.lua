-- wrk: requests from a population of CLIENTS client addresses behind a
-- trusted proxy, cycled in turn, so allowed traffic spreads over many
-- rate-limit keys. The default (2^24) makes every request of a run a new
-- client; CLIENTS=1024 has a fixed population come back.
local clients = tonumber(os.getenv("CLIENTS") or "16777216")
local n = 0
request = function()
  n = n + 1
  local c = n % clients
  local ip = string.format("10.%d.%d.%d",
    math.floor(c / 65536) % 256, math.floor(c / 256) % 256, c % 256)
  return wrk.format("GET", "/api/v1/ping", { ["X-Forwarded-For"] = ip })
end
