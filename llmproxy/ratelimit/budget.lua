-- Shared by reserve.lua and reconcile.lua (prepended to each when the scripts are loaded).
-- A budget counter is a hash: "s" = settled spend of its scope and period, "h" = sum of the
-- holds of calls in flight, "h:<hold id>" = one hold. A sorted set beside it ranks the
-- hold ids by deadline (ms), so holds whose call never settled (its worker was killed) are
-- released. Amounts are integer nano-dollars, passed on as the strings they came as: Lua
-- would print a large number in exponent form, which HINCRBY refuses.

-- Drop one hold. Lua prints -0 as "-0", which HINCRBY refuses: a hold of 0 is only deleted.
local function unhold(key, id, amount)
  redis.call('HDEL', key, 'h:' .. id)
  local n = tonumber(amount)
  if n > 0 then
    redis.call('HINCRBY', key, 'h', -n)
  end
end

local function release_expired(key, zkey, now)
  local expired = redis.call('ZRANGEBYSCORE', zkey, '-inf', now)
  if #expired == 0 then
    return
  end
  for _, id in ipairs(expired) do
    local amount = redis.call('HGET', key, 'h:' .. id)
    if amount then
      unhold(key, id, amount)
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

-- Replace a hold with the spend, once: the hold is the settlement's token, so a settlement
-- sent again (its first reply was lost) changes nothing. A missing counter (Redis restarted
-- since the call was admitted) is left missing: the ledger has the spend, and the counter
-- is rebuilt from it. A hold already released by its TTL takes its spend with it: only a
-- settlement later than budgets.hold_seconds is lost (the ledger still has it).
local function settle(key, zkey, id, amount, expires_ms)
  if redis.call('HEXISTS', key, 's') == 0 then
    return
  end
  local held = redis.call('HGET', key, 'h:' .. id)
  if not held then
    return
  end
  unhold(key, id, held)
  redis.call('ZREM', zkey, id)
  if tonumber(amount) > 0 then
    redis.call('HINCRBY', key, 's', amount)
  end
  keep_until(key, zkey, expires_ms)
end
