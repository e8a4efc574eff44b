-- keyguard admission: every window, quota and the concurrency slot of one bucket,
-- checked and charged all or nothing, in one atomic step (keyguard/windows.py is the
-- reference; this is the same arithmetic).
--
-- KEYS[1] windows hash  {<prefix>:<bucket>}:win    field "b<seconds>:<scope>" ->
--         struct "<ddd" (width_ms, k0, total) then one little-endian uint32 per slot
--         (n_k0, n_k0+1, ...): slot k holds the requests of ((k-1)*width, k*width]
--         (ms); the first and last slots are never empty. Binary, with its total, so
--         that a hit costs O(1) in the usual case (no slot left the window, or one
--         did): Lua loops over tables cost ~50 ns an element here, and a minute window
--         holds 60 slots.
-- KEYS[2] quotas hash   {<prefix>:<bucket>}:quota  field "<day|month>:<scope>" ->
--         "<YYYY-MM-DD|YYYY-MM>:<used>"
-- A hash lives until its counters' last slot (or period) ends: the expiry is moved
-- only when a charge moves that time past what the stored counters already reached
-- (their last slots, their periods), which the key's expiry covers. (Earlier versions
-- kept that time in a field "x"; it is neither read nor written any more.)
-- KEYS[3] leases zset   {<prefix>:<bucket>}:lease  lease id -> expiry (ms)
-- One hash tag per bucket, so the script runs on Redis Cluster.
--
-- ARGV: mode ("hit" charges, "peek" only reads), t_ms and wall_us (both "" -> server
-- TIME; a test clock passes its own), cost, "=" .. lease ("" none); then the numbers,
-- as little-endian doubles in one string (tonumber runs strtod, which costs more than
-- the rest of the parsing): the store's lease_ms and ttl_pad_ms, the policy's cap (-1
-- none), nc, nc spans (ms), nc slot widths (ms); nw, nw counters, nw limits; nq, nq
-- periods (1 "day", 2 "month"); nl, nl quotas, nl limits (each list whole; the
-- script reads them in place); then the nc counter fields, the nq quota fields; then any leases of this bucket released since its last call (the client
-- defers releases: ZREM is idempotent, so one carried twice, or after its expiry, is
-- harmless). In that order so the client sends the policy's part pre-encoded.
--
-- Returns {allowed, retry_ms (-1: waiting cannot help), denied (1-based limit, 0 none),
-- then per limit in order: remaining, reset_ms [, period_s for a quota]}.

local mode = ARGV[1]
local t, wall_us
if ARGV[2] == "" then
  local now = redis.call("TIME")
  local sec, usec = tonumber(now[1]), tonumber(now[2])
  t = sec * 1000 + math.floor((usec + 500) / 1000)
  wall_us = sec * 1000000 + usec
else
  t, wall_us = tonumber(ARGV[2]), tonumber(ARGV[3])
end
local charging = mode == "hit"
local cost = charging and tonumber(ARGV[4]) or 0
local lease = charging and ARGV[5] ~= "" and ARGV[5]:sub(2) or nil -- "=<id>", so "" is an id
local v = { struct.unpack("<" .. string.rep("d", #ARGV[6] / 8), ARGV[6]) }
local lease_ms, pad, cap = v[1], v[2], v[3] >= 0 and v[3] or nil
local QUOTA_MARGIN_MS = 3600000 -- a quota counter outlives its period by an hour

-- What a script allocates is most of what it costs (Redis's Lua collects all of it):
-- a table ~800 instructions, more if it grows element by element (~1,000 a growth), a
-- closure ~900, a string ~1,000 and more for a long one; a call to a function ~600, to
-- math.floor ~350 (an operator: ~50); a redis.call 4,000 to 11,000. So the policy is
-- read in place from v, each counter and quota is one table built whole, the functions
-- only a rare path needs are made on that path, and hot arithmetic uses operators:
-- (a - a % b) / b is floor(a / b) for the integers here, as Lua's % is a - floor(a/b)*b.
local function floor_div(a, b) -- exact beyond 2^53 / b too, where a / b rounds
  local q = (a - a % b) / b
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

-- The policy, read in place: counter c spans v[4 + c] ms in slots of v[4 + nc + c] ms;
-- window w counts on counter v[W + w] up to v[W + nw + w]; quota q's period is v[Q + q]
-- (1 a day, 2 a month); quota limit l charges quota v[L + l] up to v[L + nl + l].
-- Counter c's field is ARGV[6 + c], quota q's ARGV[6 + nc + q].
local nc = v[4]
local W = 5 + 2 * nc
local nw = v[W]
local Q = W + 2 * nw + 1
local nq = v[Q]
local L = Q + nq + 1
local nl = v[L]

-- read everything first: a WRONGTYPE key fails here, before anything is written
-- what the stored counters reach (ms): the hashes' expiries cover it already
local wreach, qreach = -math.huge, -math.huge
-- Counter c, as read: its span and slot width (ms), its first slot k0, its slots
-- (body from byte skip + 1 on: the string as stored, its header skipped, so that
-- reading, expiring and charging it make one new string, its new value), how many,
-- their total, the slot t falls in (kt; slot k holds ((k-1)*width, k*width]).
local counters = { unpack(v, 1, nc) } -- built at its size; each entry replaced below
if nc > 0 then
  local raw = redis.call("HMGET", KEYS[1], unpack(ARGV, 7, 6 + nc))
  for c = 1, nc do
    local span, width, k0, body, n, total = v[4 + c], v[4 + nc + c], 0, "", 0, 0
    local stored = raw[c]
    if stored and #stored > 24 then
      width, k0, total = struct.unpack("<ddd", stored)
      body, n = stored, (#stored - 24) / 4
      local reach = (k0 + n - 1) * width + span
      if reach > wreach then wreach = reach end
    end
    counters[c] = {
      span = span, width = width, k0 = k0, body = body, skip = body == "" and 0 or 24,
      n = n, total = total, kt = -floor_div(-t, width), changed = false,
    }
  end
end

local U32 = "<I4"
local function slot(ctr, j) -- the count of a counter's j-th slot (1-based)
  return (struct.unpack(U32, ctr.body, ctr.skip + 4 * j - 3))
end

local function slots(ctr) -- a counter's slots as a string of their own
  return ctr.skip == 0 and ctr.body or ctr.body:sub(ctr.skip + 1)
end

-- Expiry in O(slots dropped) when no slot lies in the future. Otherwise (a clock
-- stepped back) the general case, kept as keyguard.windows writes it: drop slots that
-- left the window, fold slots from the future into the current one, strip empty slots
-- at both ends. What changed is kept even by a refusal (at most once a slot), so a
-- step back locks out for one window at most. The ends of what this script stores are
-- never empty; one that is (stored otherwise) is stripped when its slot leaves.
for c = 1, nc do
  local ctr = counters[c]
  local n = ctr.n
  if n > 0 then
    local width, first, now = ctr.width, ctr.k0, ctr.kt
    local gone = floor_div(t - ctr.span, width) - first + 1 -- slots with k * width <= t - span
    local future = 0
    if first + n - 1 > now then
      local kept = {}
      for j = math.max(gone, 0) + 1, n do
        if first + j - 1 > now then future = future + slot(ctr, j) else kept[#kept + 1] = slot(ctr, j) end
      end
      local start = first + math.max(gone, 0)
      if future > 0 then
        if #kept == 0 then start = now end
        while start + #kept - 1 < now do kept[#kept + 1] = 0 end
        kept[#kept] = kept[#kept] + future
      end
      local lo, hi = 1, #kept
      while lo <= hi and kept[lo] == 0 do lo = lo + 1 end
      while hi >= lo and kept[hi] == 0 do hi = hi - 1 end
      local parts, sum = {}, 0
      for j = lo, hi do parts[#parts + 1] = struct.pack(U32, kept[j]); sum = sum + kept[j] end
      ctr.k0, ctr.n, ctr.total = start + lo - 1, hi - lo + 1, sum
      ctr.body, ctr.skip = table.concat(parts), 0
    elseif gone >= n then
      ctr.k0, ctr.body, ctr.skip, ctr.n, ctr.total = first + gone, "", 0, 0, 0
    elseif gone > 0 then
      local dropped, lo, hi = 0, gone + 1, n
      for j = 1, gone do dropped = dropped + slot(ctr, j) end
      while lo < hi and slot(ctr, lo) == 0 do lo = lo + 1 end
      while hi > lo and slot(ctr, hi) == 0 do hi = hi - 1 end
      ctr.k0, ctr.skip, ctr.n = first + lo - 1, ctr.skip + 4 * (lo - 1), hi - lo + 1
      ctr.total = ctr.total - dropped
      if hi < n then ctr.body = ctr.body:sub(1, ctr.skip + 4 * ctr.n) end
    end
    ctr.changed = gone > 0 or future > 0
  end
end

-- Quota q: its period (id, start and end, epoch seconds) and the units used in it.
local quotas = { unpack(v, 1, nq) } -- built at its size; each entry replaced below
local stale -- fields of quotas whose stored period is past: dropped by any hit
if nq > 0 then
  local raw = redis.call("HMGET", KEYS[2], unpack(ARGV, 7 + nc, 6 + nc + nq))
  -- the UTC calendar (proleptic Gregorian; H. Hinnant's civil_from_days)
  local z = floor_div(floor_div(wall_us, 1000000), 86400) -- the day number
  local era = floor_div(z + 719468, 146097)
  local doe = z + 719468 - era * 146097
  local e = doe - (doe - doe % 1460) / 1460 + (doe - doe % 36524) / 36524
    - (doe - doe % 146096) / 146096
  local yoe = (e - e % 365) / 365
  local doy = doe - (365 * yoe + (yoe - yoe % 4) / 4 - (yoe - yoe % 100) / 100)
  local mp = (5 * doy + 2 - (5 * doy + 2) % 153) / 153
  local d = doy - (153 * mp + 2 - (153 * mp + 2) % 5) / 5 + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  local days = 28 + (m + (m - m % 8) / 8) % 2 + 2 % m + 2 * (1 - (1 % m)) -- Feb: 28
  if m == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then days = 29 end
  local month_start = (z - d + 1) * 86400
  local day_id, month_id -- made when a quota needs it
  for q = 1, nq do
    local day = v[Q + q] == 1
    local pid, start, stop
    if day then
      day_id = day_id or string.format("%04d-%02d-%02d", y, m, d)
      pid, start, stop = day_id, z * 86400, z * 86400 + 86400
    else
      month_id = month_id or string.format("%04d-%02d", y, m)
      pid, start, stop = month_id, month_start, month_start + days * 86400
    end
    local used = 0
    local stored = raw[q]
    if stored then
      local spid, sused = string.match(stored, "^(.+):(%d+)$")
      if spid and spid >= pid then -- the current period, or a later one (clock stepped back)
        used = tonumber(sused)
        if spid ~= pid then -- its bounds, by Hinnant's days_from_civil
          local function days_from_civil(yy, mm, dd)
            if mm <= 2 then yy = yy - 1 end
            local r = floor_div(yy, 400)
            local ye = yy - r * 400
            local dy = math.floor((153 * (mm > 2 and mm - 3 or mm + 9) + 2) / 5) + dd - 1
            return r * 146097 + ye * 365 + math.floor(ye / 4) - math.floor(ye / 100) + dy - 719468
          end
          local sy, sm = tonumber(spid:sub(1, 4)), tonumber(spid:sub(6, 7))
          if day then
            local sd = tonumber(spid:sub(9, 10))
            pid, start = string.format("%04d-%02d-%02d", sy, sm, sd), days_from_civil(sy, sm, sd) * 86400
            stop = start + 86400
          else
            pid, start = string.format("%04d-%02d", sy, sm), days_from_civil(sy, sm, 1) * 86400
            stop = (sm == 12 and days_from_civil(sy + 1, 1, 1) or days_from_civil(sy, sm + 1, 1)) * 86400
          end
        end
        local reach = stop * 1000 + QUOTA_MARGIN_MS
        if reach > qreach then qreach = reach end
      else
        stale = stale or {}
        stale[#stale + 1] = ARGV[6 + nc + q]
      end
    end
    quotas[q] = { pid = pid, used = used, start = start, stop = stop }
  end
end

local released = 7 + nc + nq -- ARGV[released..]: leases given back; counted out now, removed
local function forget_released() -- with the writes, so OOM still fails an admission whole
  if released <= #ARGV then redis.call("ZREM", KEYS[3], unpack(ARGV, released)) end
  if stale then redis.call("HDEL", KEYS[2], unpack(stale)) end
end

-- held: live slots but those released now. Each call a script makes costs about a
-- microsecond, so the lease's own score and the soonest expiry are asked only when
-- other slots are held; with none, the lease is live only if it is being released.
local held, present, soonest, releasing = 0, false, nil, false
if cap then
  local live = "(" .. t
  held = redis.call("ZCOUNT", KEYS[3], live, "+inf")
  if held > 0 then
    local seen = released < #ARGV and {} -- a lease released twice frees one slot
    for j = released, #ARGV do
      local id = ARGV[j]
      if not (seen and seen[id]) then
        if seen then seen[id] = true end
        local score = redis.call("ZSCORE", KEYS[3], id)
        if score and tonumber(score) > t then
          held = held - 1
          if id == lease then present, releasing = true, true end
        end
      end
    end
  end
  if held > 0 then
    if held + 1 >= cap then
      soonest = tonumber(redis.call("ZRANGEBYSCORE", KEYS[3], live, "+inf", "WITHSCORES", "LIMIT", 0, 1)[2])
    end
    if lease then
      local score = redis.call("ZSCORE", KEYS[3], lease)
      present = score ~= false and tonumber(score) > t
    end
  end
end

-- The reply admitting this hit, with the states it leaves, or nil if a limit refuses
-- it: {1, -1, 0, then per limit: remaining, reset_ms [, period_s for a quota]}.
local function if_charged()
  local out = { unpack(v, 1, 3 + 2 * nw + 3 * nl + (cap and 2 or 0)) } -- at its size
  out[1], out[2], out[3] = 1, -1, 0
  local j = 3
  for w = 1, nw do
    local ctr, limit = counters[v[W + w]], v[W + nw + w]
    local used, stop
    if ctr.n == 0 then
      if limit < 1 then return nil end
      used, stop = 0, ctr.kt * ctr.width + ctr.span
    else
      used = ctr.total
      if used >= limit then return nil end
      stop = ctr.k0 * ctr.width + ctr.span
    end
    out[j + 1], out[j + 2], j = limit - used - 1, stop - t, j + 2
  end
  for l = 1, nl do
    local quota, limit = quotas[v[L + l]], v[L + nl + l]
    local used = quota.used + cost
    if used > limit then return nil end
    local reset = (quota.stop * 1000000 - wall_us) / 1000 + 0.5 -- ms to the period's end
    out[j + 1], out[j + 2] = limit - used, reset - reset % 1
    out[j + 3], j = quota.stop - quota.start, j + 3
  end
  if cap then
    local taken = held + (present and 0 or 1)
    if taken > cap then return nil end
    out[j + 1] = cap - taken
    out[j + 2] = (taken >= cap and held > 0) and math.min(1000, soonest - t) or 0
  end
  return out
end

-- Writes come last, and an admission's first write is one Redis refuses at maxmemory
-- (HSET, ZADD): once a script has written, Redis lets its later writes past OOM, so
-- under OOM an admission fails whole, never half-charged. A refusal only keeps what
-- expiry changed (as keyguard.windows does), mostly by deleting.
if charging then
  local reply = if_charged()
  if reply then
    -- charge: windows count requests, quotas units, the lease takes a slot
    if nc > 0 then
      local fields, x = { unpack(v, 1, 2 * nc) }, 0 -- at its size
      for c = 1, nc do
        local ctr = counters[c]
        local width, n, k = ctr.width, ctr.n, ctr.kt
        local stored -- the header, the slots kept, the charged slot
        if n == 0 then
          stored = struct.pack("<dddI4", width, k, 1, 1)
        else
          local head = struct.pack("<ddd", width, ctr.k0, ctr.total + 1)
          if ctr.k0 + n - 1 == k then -- the last slot is the current one (settled above)
            stored = head .. ctr.body:sub(ctr.skip + 1, -5) .. struct.pack(U32, slot(ctr, n) + 1)
          else
            stored = head .. slots(ctr) .. ("\0\0\0\0"):rep(k - ctr.k0 - n) .. struct.pack(U32, 1)
          end
        end
        fields[2 * c - 1], fields[2 * c] = ARGV[6 + c], stored
        local reach = k * width + ctr.span
        if reach > x then x = reach end
      end
      redis.call("HSET", KEYS[1], unpack(fields))
      -- Moved once per slot of the longest window (24 min for a day), not every hit.
      if x > wreach then redis.call("PEXPIRE", KEYS[1], math.max(1, x - t) + pad) end
    end
    if nq > 0 and cost > 0 then
      local fields, x = { unpack(v, 1, 2 * nq) }, 0 -- at its size
      for q = 1, nq do
        local quota = quotas[q]
        fields[2 * q - 1], fields[2 * q] = ARGV[6 + nc + q], quota.pid .. ":" .. (quota.used + cost)
        local reach = quota.stop * 1000 + QUOTA_MARGIN_MS
        if reach > x then x = reach end
      end
      redis.call("HSET", KEYS[2], unpack(fields))
      if x > qreach then
        redis.call("PEXPIRE", KEYS[2], math.max(1, x - math.floor(wall_us / 1000)) + pad)
      end
      stale = nil -- overwritten
    end
    if cap and lease and held == 0 and not releasing then
      -- Every other member has expired or is released now: the set becomes this
      -- lease alone, whose expiry is the latest.
      redis.call("DEL", KEYS[3])
      redis.call("ZADD", KEYS[3], t + lease_ms, lease)
      redis.call("PEXPIRE", KEYS[3], lease_ms + pad)
      if stale then redis.call("HDEL", KEYS[2], unpack(stale)) end
    else
      if cap and lease then
        redis.call("ZADD", KEYS[3], t + lease_ms, lease)
        redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", t)
        local last = tonumber(redis.call("ZRANGE", KEYS[3], -1, -1, "WITHSCORES")[2])
        redis.call("PEXPIRE", KEYS[3], math.max(1, last - t) + pad)
      end
      forget_released()
    end
    return reply
  end
  forget_released()
  if cap then redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", t) end
  for c = 1, nc do
    local ctr = counters[c]
    if ctr.changed and ctr.n > 0 then
      redis.call("HSET", KEYS[1], ARGV[6 + c],
        struct.pack("<ddd", ctr.width, ctr.k0, ctr.total) .. slots(ctr))
    elseif ctr.changed then
      redis.call("HDEL", KEYS[1], ARGV[6 + c])
    end
  end
else
  stale = nil -- a peek writes nothing else
  forget_released()
end

-- Refused, or a peek: each limit's state with nothing charged, and the limit whose
-- wait is longest ("never" beats every wait) is the one that refuses.
local reply = { unpack(v, 1, 3 + 2 * nw + 3 * nl + (cap and 2 or 0)) } -- at its size
local worst, worst_wait, j = 0, -2, 3
local function refuse(index, wait) -- wait nil: waiting cannot help
  local w = wait == nil and math.huge or wait
  if w > worst_wait then worst, worst_wait = index, w end
end
for w = 1, nw do
  local ctr, limit = counters[v[W + w]], v[W + nw + w]
  local n, used = ctr.n, ctr.total
  if used >= limit then
    local wait = nil
    if limit >= 1 and n > 0 then
      local excess, shed = used + 1 - limit, 0
      wait = 0
      for i = 1, n do
        shed = shed + slot(ctr, i)
        if shed >= excess then wait = (ctr.k0 + i - 1) * ctr.width + ctr.span - t; break end
      end
    end
    refuse(w, wait)
  end
  reply[j + 1] = math.max(0, limit - used)
  reply[j + 2], j = n == 0 and 0 or ctr.k0 * ctr.width + ctr.span - t, j + 2
end
for l = 1, nl do
  local quota, limit = quotas[v[L + l]], v[L + nl + l]
  local reset = math.max(0, math.floor((quota.stop * 1000000 - wall_us) / 1000 + 0.5))
  if quota.used + cost > limit then
    if cost > limit then refuse(nw + l, nil) else refuse(nw + l, reset) end
  end
  reply[j + 1], reply[j + 2] = math.max(0, limit - quota.used), reset
  reply[j + 3], j = quota.stop - quota.start, j + 3
end
if cap then
  local wait = (held >= cap and held > 0) and math.min(1000, soonest - t) or 0
  if held + (present and 0 or 1) > cap then
    if cap >= 1 then refuse(nw + nl + 1, wait) else refuse(nw + nl + 1, nil) end
  end
  reply[j + 1], reply[j + 2] = math.max(0, cap - held), wait
end
reply[1], reply[2], reply[3] = charging and 0 or 1, worst_wait == math.huge and -1 or worst_wait, worst
return reply
