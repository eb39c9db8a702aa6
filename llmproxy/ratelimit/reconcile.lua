-- Settle budget holds and apply reconciliation deltas (see budget.lua and adjust.lua).
--
-- KEYS[1..2s]  per settlement: the budget's hash and its holds' sorted set
-- KEYS[2s+1..]  counter hashes, as in reserve.lua
-- ARGV[1]  now in milliseconds, or "" to use the Redis server clock
-- ARGV[2]  s
-- ARGV[2 + 3(k-1) + 1..3]  hold id, amount spent, expires_ms (0 = never)
-- ARGV[2 + 3s + 4(i-1) + 1..4]  bucket, delta, granularity_ms, span

local now = clock(ARGV[1])
local s = tonumber(ARGV[2])
for k = 1, s do
  local a = 2 + 3 * (k - 1)
  settle(KEYS[2 * k - 1], KEYS[2 * k], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]))
end
adjust(now, 2 * s + 1, #KEYS - 2 * s, 2 + 3 * s)
return #KEYS
