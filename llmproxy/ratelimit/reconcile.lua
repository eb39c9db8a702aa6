-- Apply reconciliation deltas to past reservations (real usage minus the estimate).
--
-- KEYS[i]  counter hashes, as in reserve.lua
-- ARGV[1]  now in milliseconds, or "" to use the Redis server clock
-- ARGV[1 + 4(i-1) + 1..4]  bucket, delta, granularity_ms, span
-- A delta goes to the bucket the reservation charged while that bucket is still in the window;
-- otherwise a positive delta is charged to the current bucket (counted a little longer, never
-- shorter) and a negative one is dropped (the reservation has already expired).

local now = clock(ARGV[1])
for i = 1, #KEYS do
  local key = KEYS[i]
  local a = 1 + (i - 1) * 4
  local bucket, delta = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local g, span = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local current = math.floor(now / g)
  if delta ~= 0 then
    local have = nil
    if bucket > current - span then
      have = tonumber(redis.call('HGET', key, bucket))
    end
    if have ~= nil then
      if have + delta <= 0 then
        redis.call('HDEL', key, bucket)
        redis.call('HINCRBY', key, 't', -have)
      else
        redis.call('HINCRBY', key, bucket, delta)
        redis.call('HINCRBY', key, 't', delta)
      end
    elseif delta > 0 then
      redis.call('HINCRBY', key, current, delta)
      redis.call('HINCRBY', key, 't', delta)
      local oldest = tonumber(redis.call('HGET', key, 'o'))
      if oldest == nil then
        redis.call('HSET', key, 'o', current)
      end
    end
    if (tonumber(redis.call('HGET', key, 't')) or 0) <= 0 then
      redis.call('DEL', key)
    else
      redis.call('PEXPIRE', key, (span + 1) * g)
    end
  end
end
return #KEYS
