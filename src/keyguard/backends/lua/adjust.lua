-- keyguard settlement: give back (delta < 0) or charge further (delta > 0) the units an
-- admission charged to a bucket's quota counters, atomically, never refusing.
--
-- KEYS[1] quotas hash {<prefix>:<bucket>}:quota (the layout of admit.lua)
-- ARGV: wall_us ("" -> server TIME; a test clock passes its own), delta, ttl_pad_ms,
-- then per counter: field, period id, period start and end (epoch seconds, computed
-- by the client from the id: calendar arithmetic needs no clock).
--
-- A counter moves only while its period is the current one, so a refund after a UTC
-- rollover never credits the new period. A refund stops at zero; a charge may pass
-- the limit. Returns how many counters changed.

local wall_us
if ARGV[1] == "" then
  local now = redis.call("TIME")
  wall_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
else
  wall_us = tonumber(ARGV[1])
end
local delta, pad = tonumber(ARGV[2]), tonumber(ARGV[3])
local QUOTA_MARGIN_MS = 3600000 -- as admit.lua: a counter outlives its period by an hour

local fields = {}
for i = 4, #ARGV, 4 do fields[#fields + 1] = ARGV[i] end
local raw = redis.call("HMGET", KEYS[1], unpack(fields))
local x, writes = 0, {}
for i = 4, #ARGV, 4 do
  local pid, start, stop = ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  if wall_us >= start * 1000000 and wall_us < stop * 1000000 then
    local used, ours = 0, true
    local stored = raw[(i - 4) / 4 + 1]
    if stored then
      local spid, sused = string.match(stored, "^(.+):(%d+)$")
      if spid == pid then
        used = tonumber(sused)
      elseif spid and spid > pid then
        ours = false -- a later period (a clock stepped back) is not this admission's
      end -- a past period counts as nothing, as in admit.lua
    end
    if ours and (used > 0 or delta > 0) then
      writes[#writes + 1] = ARGV[i]
      writes[#writes + 1] = pid .. ":" .. math.max(0, used + delta)
      x = math.max(x, stop * 1000 + QUOTA_MARGIN_MS)
    end
  end
end
if #writes == 0 then return 0 end
redis.call("HSET", KEYS[1], unpack(writes))
-- Only ever later: another counter of the hash (a longer period) may need more.
local ttl = math.max(1, x - math.floor(wall_us / 1000)) + pad
if redis.call("PTTL", KEYS[1]) < ttl then redis.call("PEXPIRE", KEYS[1], ttl) end
return #writes / 2
