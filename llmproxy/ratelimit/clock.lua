-- Shared by reserve.lua and reconcile.lua (prepended to each when the scripts are loaded).
-- ARGV[1] is "now" in milliseconds, or "" to use the Redis server clock, which every host
-- sharing this Redis then agrees on.
local function clock(arg)
  if arg ~= nil and arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
