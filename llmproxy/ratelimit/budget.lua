-- Shared by reserve.lua and reconcile.lua (prepended to each when the scripts are loaded).
-- A budget counter is a hash: "s" = settled spend of its scope and period, "h" = sum of the
-- holds of calls in flight, "h:<hold id>" = one hold. A sorted set beside it ranks the
-- hold ids by deadline (ms), so holds whose call never settled (its worker was killed) are
-- released. Amounts are integer nano-dollars, passed on as the strings they came as: Lua
-- would print a large number in exponent form, which HINCRBY refuses.

local function release_expired(key, zkey, now)
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  if #expired == 0 then
    return
  end
  for _, id in ipairs(expired) do
    local amount = redis.call('HGET', key, 'h:' .. id)
    if amount then
      redis.call('HINCRBY', key, 'h', -tonumber(amount))
      redis.call('HDEL', key, 'h:' .. id)
    end
  end
  redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now)
end

-- Counters of a period are kept until it has ended (and a day more); "total" ones for good.
local function keep_until(key, zkey, expires_ms)
  if expires_ms > 0 then
    redis.call('PEXPIREAT', key, expires_ms)
    redis.call('PEXPIREAT', zkey, expires_ms)
  end
end

-- Replace a hold with the spend. A missing counter (Redis restarted since the call was
-- admitted) is left missing: the ledger has the spend, and the counter is rebuilt from it.
local function settle(key, zkey, id, amount, expires_ms)
  if redis.call('HEXISTS', key, 's') == 0 then
    return
  end
  local held = redis.call('HGET', key, 'h:' .. id)
  if held then
    redis.call('HDEL', key, 'h:' .. id)
    redis.call('HINCRBY', key, 'h', -tonumber(held))
    redis.call('ZREM', zkey, id)
  end
  if tonumber(amount) > 0 then
    redis.call('HINCRBY', key, 's', amount)
  end
  keep_until(key, zkey, expires_ms)
end
