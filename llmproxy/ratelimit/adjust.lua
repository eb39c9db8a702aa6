-- Shared by reserve.lua and reconcile.lua (prepended to each when the scripts are loaded).
-- Apply reconciliation deltas to past reservations (real usage minus the estimate):
-- counters KEYS[first .. first + count - 1], each with four arguments starting after
-- ARGV[args]: bucket, delta, granularity_ms, span.
-- A delta goes to the bucket the reservation charged while that bucket is still in the window;
-- otherwise a positive delta is charged to the current bucket (counted a little longer, never
-- shorter) and a negative one is dropped (the reservation has already expired).
local function adjust(now, first, count, args)
  for i = 0, count - 1 do
    local key = KEYS[first + i]
    local a = args + i * 4
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
end
