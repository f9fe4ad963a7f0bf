-- wrk: each request from a different client behind a trusted proxy, so an
-- allowed-traffic run spreads over many rate-limit keys, as real traffic does.
local n = 0
request = function()
  n = n + 1
  local ip = string.format("10.%d.%d.%d",
    math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  return wrk.format("GET", "/api/v1/ping", { ["X-Forwarded-For"] = ip })
end
