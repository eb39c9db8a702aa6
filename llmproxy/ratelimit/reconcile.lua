-- Apply reconciliation deltas on their own (see adjust.lua).
--
-- KEYS[i]  counter hashes, as in reserve.lua
-- ARGV[1]  now in milliseconds, or "" to use the Redis server clock
-- ARGV[1 + 4(i-1) + 1..4]  bucket, delta, granularity_ms, span

adjust(clock(ARGV[1]), 1, #KEYS, 1)
return #KEYS
