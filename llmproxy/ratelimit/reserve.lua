-- Check every counter and, only if all have room, charge all of them: one atomic step.
-- Corrections of earlier requests (see adjust.lua) may ride along and are applied first, so
-- that they cost no round trip of their own.
--
-- KEYS[1..n]  one hash per counter: field "t" = total in the window, "o" = oldest bucket
--             index, "<bucket index>" = amount charged in that bucket.
-- KEYS[n+1..n+2m]  per budget: its hash and its holds' sorted set (see budget.lua)
-- KEYS[n+2m+1..n+2m+2s]  the same for each budget settlement carried along
-- KEYS[n+2m+2s+1..] counters to correct
-- ARGV[1]  now in milliseconds, or "" to use the Redis server clock (shared by every host)
-- ARGV[2]  n;  ARGV[3]  m;  ARGV[4]  hold id;  ARGV[5]  hold TTL in milliseconds;  ARGV[6]  s
-- ARGV[6 + 6(i-1) + 1..6]  limit, cost, need, granularity_ms, span, optimistic (0|1)
-- ARGV[6 + 6n + 4(k-1) + 1..4]  limit, cost, expires_ms (0 = never), seed ("" = none)
-- ARGV[6 + 6n + 4m + 3(l-1) + 1..3]  hold id, amount, expires_ms of settlement l
-- ARGV[6 + 6n + 4m + 3s + 4(j-1) + 1..4]  bucket, delta, granularity_ms, span of correction j
-- Returns {allowed (0|1), now_ms, then per counter: bucket, used, retry_ms (-1 = fits),
-- reset_ms, then per budget: spent, held}; or {-1, now_ms, k...} when budget counters k are
-- missing and came without a seed (nothing charged: the caller reads the ledger and retries).
-- All times are integers in milliseconds; bucket b counts until (b + span) * granularity_ms.

-- Drop the buckets that left the window; return total and the sorted remaining buckets
-- (the list only when it had to be read anyway, else nil) and the oldest bucket index.
local function evict(key, current, span)
  local oldest = tonumber(redis.call('HGET', key, 'o'))
  if oldest == nil then
    return 0, nil
  end
  local horizon = current - span
  if oldest > horizon then
    return tonumber(redis.call('HGET', key, 't')) or 0, oldest
  end
  -- Rebuild from the fields: exact, and it heals any drift of the stored total.
  local fields = redis.call('HGETALL', key)
  local total, first = 0, nil
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name ~= 't' and name ~= 'o' then
      local index = tonumber(name)
      if index <= horizon then
        redis.call('HDEL', key, name)
      else
        total = total + tonumber(fields[j + 1])
        if first == nil or index < first then
          first = index
        end
      end
    end
  end
  if first == nil then
    redis.call('DEL', key)
    return 0, nil
  end
  redis.call('HSET', key, 't', total, 'o', first)
  return total, first
end

local function fits(used, limit, need, optimistic)
  if optimistic == 1 and used <= 0 then
    return true
  end
  return used + need <= limit
end

-- Milliseconds until the counter fits, as its oldest buckets leave the window.
local function retry_ms(key, used, limit, need, g, span, optimistic, now)
  local fields = redis.call('HGETALL', key)
  local buckets = {}
  for j = 1, #fields, 2 do
    local name = fields[j]
    if name ~= 't' and name ~= 'o' then
      buckets[#buckets + 1] = {tonumber(name), tonumber(fields[j + 1])}
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  local leave = now
  for _, bucket in ipairs(buckets) do
    used = used - bucket[2]
    leave = (bucket[1] + span) * g
    if fits(used, limit, need, optimistic) then
      break
    end
  end
  return math.max(leave - now, 0)
end

local now = clock(ARGV[1])
local n, m = tonumber(ARGV[2]), tonumber(ARGV[3])
local hold, hold_ttl, s = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local budget_args = 6 + 6 * n
local settle_args = budget_args + 4 * m
for l = 1, s do
  local a = settle_args + 3 * (l - 1)
  settle(KEYS[n + 2 * m + 2 * l - 1], KEYS[n + 2 * m + 2 * l], ARGV[a + 1], ARGV[a + 2],
         tonumber(ARGV[a + 3]))
end
adjust(now, n + 2 * m + 2 * s + 1, #KEYS - n - 2 * m - 2 * s, settle_args + 3 * s)

local missing = {-1, now}
for k = 1, m do
  local key = KEYS[n + 2 * k - 1]
  if redis.call('HEXISTS', key, 's') == 0 then
    local seed = ARGV[budget_args + 4 * (k - 1) + 4]
    if seed == '' then
      missing[#missing + 1] = k
    else
      redis.call('HSET', key, 's', seed)
      keep_until(key, KEYS[n + 2 * k], tonumber(ARGV[budget_args + 4 * (k - 1) + 3]))
    end
  end
end
if #missing > 2 then
  return missing
end

local params, used, oldest = {}, {}, {}
local allowed = true
local spent, held = {}, {}
for k = 1, m do
  local key, zkey = KEYS[n + 2 * k - 1], KEYS[n + 2 * k]
  local a = budget_args + 4 * (k - 1)
  release_expired(key, zkey, now)
  spent[k] = tonumber(redis.call('HGET', key, 's')) or 0
  held[k] = tonumber(redis.call('HGET', key, 'h')) or 0
  if spent[k] + held[k] + tonumber(ARGV[a + 2]) > tonumber(ARGV[a + 1]) then
    allowed = false
  end
end
for i = 1, n do
  local a = 6 + (i - 1) * 6
  local p = {
    limit = tonumber(ARGV[a + 1]), cost = tonumber(ARGV[a + 2]), need = tonumber(ARGV[a + 3]),
    g = tonumber(ARGV[a + 4]), span = tonumber(ARGV[a + 5]), optimistic = tonumber(ARGV[a + 6]),
  }
  p.current = math.floor(now / p.g)
  params[i] = p
  used[i], oldest[i] = evict(KEYS[i], p.current, p.span)
  if not fits(used[i], p.limit, p.need, p.optimistic) then
    allowed = false
  end
end

local out = {allowed and 1 or 0, now}
for i = 1, n do
  local key, p = KEYS[i], params[i]
  local retry = -1
  if allowed then
    if p.cost > 0 then
      redis.call('HINCRBY', key, p.current, p.cost)
      used[i] = redis.call('HINCRBY', key, 't', p.cost)
      if oldest[i] == nil then
        oldest[i] = p.current
        redis.call('HSET', key, 'o', p.current)
      end
      redis.call('PEXPIRE', key, (p.span + 1) * p.g)
    end
  elseif not fits(used[i], p.limit, p.need, p.optimistic) then
    retry = retry_ms(key, used[i], p.limit, p.need, p.g, p.span, p.optimistic, now)
  end
  local reset = 0
  if oldest[i] ~= nil then
    reset = math.max((oldest[i] + p.span) * p.g - now, 0)
  end
  out[#out + 1] = p.current
  out[#out + 1] = used[i]
  out[#out + 1] = retry
  out[#out + 1] = reset
end
for k = 1, m do
  local key, zkey = KEYS[n + 2 * k - 1], KEYS[n + 2 * k]
  local a = budget_args + 4 * (k - 1)
  local cost = ARGV[a + 2]
  if allowed then  -- a hold of 0 too: it is what the settlement is matched against
    redis.call('HSET', key, 'h:' .. hold, cost)
    held[k] = redis.call('HINCRBY', key, 'h', cost)
    redis.call('ZADD', zkey, now + hold_ttl, hold)
    keep_until(key, zkey, tonumber(ARGV[a + 3]))
  end
  out[#out + 1] = spent[k]
  out[#out + 1] = held[k]
end
return out
