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
-- periods (1 "day", 2 "month"); nl, nl quotas, nl limits (each list whole, so one
-- unpack builds its table at its size); then the nc counter fields, the nq quota
-- fields; then any leases of this bucket released since its last call (the client
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
local floor = math.floor

local function floor_div(a, b)
  local q = floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function ceil_div(a, b)
  return -floor_div(-a, b)
end

-- UTC calendar (proleptic Gregorian; H. Hinnant's days_from_civil / civil_from_days)
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor_div(y, 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = floor_div(z, 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (m <= 2 and 1 or 0), m, d
end

-- A period: id, start and end (epoch seconds).
local function period_of(kind, y, m, d)
  if kind == "day" then
    local start = days_from_civil(y, m, d) * 86400
    return string.format("%04d-%02d-%02d", y, m, d), start, start + 86400
  end
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return string.format("%04d-%02d", y, m),
    days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

local function period_at(kind, seconds) -- period_of, with the day number at hand
  local z = floor_div(seconds, 86400)
  local y, m, d = civil_from_days(z)
  if kind == "day" then
    return string.format("%04d-%02d-%02d", y, m, d), z * 86400, z * 86400 + 86400
  end
  local days = 28 + (m + floor(m / 8)) % 2 + 2 % m + 2 * floor(1 / m) -- Feb: 28
  if m == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then days = 29 end
  local start = (z - d + 1) * 86400
  return string.format("%04d-%02d", y, m), start, start + days * 86400
end

local function period_named(kind, id)
  return period_of(kind, tonumber(id:sub(1, 4)), tonumber(id:sub(6, 7)), tonumber(id:sub(9, 10)) or 1)
end

-- the policy: numbers from v, field names from ARGV; a table built by a constructor
-- is allocated once at its size (filled one by one, it grows 1, 2, 4...)
local nc = v[4]
local cspan, cwidth = { unpack(v, 5, 4 + nc) }, { unpack(v, 5 + nc, 4 + 2 * nc) }
local i = 5 + 2 * nc
local nw = v[i]
local wcounter, wlimit = { unpack(v, i + 1, i + nw) }, { unpack(v, i + nw + 1, i + 2 * nw) }
i = i + 2 * nw + 1
local nq = v[i]
local qkind = { unpack(v, i + 1, i + nq) }
for q = 1, nq do qkind[q] = qkind[q] == 1 and "day" or "month" end
i = i + nq + 1
local nl = v[i]
local lquota, llimit = { unpack(v, i + 1, i + nl) }, { unpack(v, i + nl + 1, i + 2 * nl) }
local cfield, qfield = { unpack(ARGV, 7, 6 + nc) }, { unpack(ARGV, 7 + nc, 6 + nc + nq) }

-- read everything first: a WRONGTYPE key fails here, before anything is written
-- what the stored counters reach (ms): the hashes' expiries cover it already
local wreach, qreach = -math.huge, -math.huge
-- A counter's slots are body[c] from byte skip[c] + 1 on: the string as stored, its
-- header skipped, so that reading, expiring and charging a counter make one new string
-- (its new value), not one per step (a string costs Redis's Lua ~4,000 instructions).
local k0, body, skip, nslots, total = {}, {}, {}, {}, {}
local kt = {} -- per counter: the slot t falls in (k: ((k-1)*width, k*width])
if nc > 0 then
  local raw = redis.call("HMGET", KEYS[1], unpack(cfield))
  for c = 1, nc do
    k0[c], body[c], skip[c], nslots[c], total[c] = 0, "", 0, 0, 0
    local stored = raw[c]
    if stored and #stored > 24 then
      cwidth[c], k0[c], total[c] = struct.unpack("<ddd", stored)
      body[c], skip[c], nslots[c] = stored, 24, (#stored - 24) / 4
      wreach = math.max(wreach, (k0[c] + nslots[c] - 1) * cwidth[c] + cspan[c])
    end
    kt[c] = ceil_div(t, cwidth[c])
  end
end

local U32, EMPTY = "<I4", "\0\0\0\0"
local function slot(c, j) -- the count of counter c's j-th slot (1-based)
  return (struct.unpack(U32, body[c], skip[c] + 4 * j - 3))
end

local function slots(c) -- counter c's slots as a string of their own
  return skip[c] == 0 and body[c] or body[c]:sub(skip[c] + 1)
end

-- The general case, kept as keyguard.windows writes it: drop slots that left the
-- window, fold slots from the future (a clock stepped back) into the current one,
-- strip empty slots at both ends. O(slots); only a clock step back takes it.
local function settle(c, gone, now)
  local n, first = {}, k0[c]
  for j = 1, nslots[c] do n[j] = slot(c, j) end
  local kept, future = {}, 0
  for j = 1, #n do
    local k = first + j - 1
    if j > gone then
      if k > now then future = future + n[j] else kept[#kept + 1] = n[j] end
    end
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
  k0[c], nslots[c], total[c] = start + lo - 1, hi - lo + 1, sum
  body[c], skip[c] = table.concat(parts), 0
  return future
end

-- Expiry, as settle() but in O(slots dropped) when no slot lies in the future. What
-- changed is kept even by a refusal (at most once a slot), so a step back locks out
-- for one window at most.
local changed = {}
for c = 1, nc do
  local n = nslots[c]
  if n > 0 then
    local width, first = cwidth[c], k0[c]
    local gone = floor_div(t - cspan[c], width) - first + 1 -- slots with k * width <= t - span
    local now = kt[c]
    local future = 0
    if first + n - 1 > now or slot(c, n) == 0 or slot(c, 1) == 0 then
      future = settle(c, gone, now)
    elseif gone >= n then
      k0[c], body[c], skip[c], nslots[c], total[c] = first + gone, "", 0, 0, 0
    elseif gone > 0 then
      local dropped, lo = 0, gone + 1
      for j = 1, gone do dropped = dropped + slot(c, j) end
      while slot(c, lo) == 0 do lo = lo + 1 end -- ends: the last slot is not empty
      k0[c], skip[c], nslots[c] = first + lo - 1, skip[c] + 4 * (lo - 1), n - lo + 1
      total[c] = total[c] - dropped
    end
    changed[c] = gone > 0 or future > 0
  end
end

local qpid, qused, qstart, qend, qstale = {}, {}, {}, {}, {}
if nq > 0 then
  local raw = redis.call("HMGET", KEYS[2], unpack(qfield))
  local seconds = floor_div(wall_us, 1000000)
  for q = 1, nq do
    local pid, start, stop = period_at(qkind[q], seconds)
    local used = 0
    local stored = raw[q]
    if stored then
      local spid, sused = string.match(stored, "^(.+):(%d+)$")
      if spid and spid >= pid then -- the current period, or a later one (clock stepped back)
        used = tonumber(sused)
        if spid ~= pid then pid, start, stop = period_named(qkind[q], spid) end
        qreach = math.max(qreach, stop * 1000 + QUOTA_MARGIN_MS)
      else
        qstale[q] = true -- a past period: dropped by any hit
      end
    end
    qpid[q], qused[q], qstart[q], qend[q] = pid, used, start, stop
  end
end

local released = 7 + nc + nq -- ARGV[released..]: leases given back; counted out now, removed
local function forget_released() -- with the writes, so OOM still fails an admission whole
  if released <= #ARGV then redis.call("ZREM", KEYS[3], unpack(ARGV, released)) end
end

-- held: live slots but those released now. Each call a script makes costs about a
-- microsecond, so the lease's own score and the soonest expiry are asked only when
-- other slots are held; with none, the lease is live only if it is being released.
local held, present, soonest, releasing = 0, false, nil, false
if cap then
  local live = "(" .. t
  held = redis.call("ZCOUNT", KEYS[3], live, "+inf")
  if held > 0 then
    local seen = {} -- a lease released twice frees one slot
    for j = released, #ARGV do
      local id = ARGV[j]
      if not seen[id] then
        seen[id] = true
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

local function packed(c) -- a counter as stored
  return struct.pack("<ddd", cwidth[c], k0[c], total[c]) .. slots(c)
end

local function forget_stale_quotas()
  for q = 1, nq do
    if qstale[q] then redis.call("HDEL", KEYS[2], qfield[q]) end
  end
end

local function quota_reset(q) -- ms until the quota's period ends
  return floor((qend[q] * 1000000 - wall_us) / 1000 + 0.5)
end

-- the reply admitting this hit, with the states it leaves, or nil if a limit refuses it
local function if_charged()
  local out = { 1, -1, 0 }
  for w = 1, nw do
    local c, limit = wcounter[w], wlimit[w]
    local used, stop
    if nslots[c] == 0 then
      if limit < 1 then return nil end
      used, stop = 0, kt[c] * cwidth[c] + cspan[c]
    else
      used = total[c]
      if used >= limit then return nil end
      stop = k0[c] * cwidth[c] + cspan[c]
    end
    out[#out + 1] = limit - used - 1
    out[#out + 1] = stop - t
  end
  for l = 1, nl do
    local q, limit = lquota[l], llimit[l]
    if qused[q] + cost > limit then return nil end
    out[#out + 1] = limit - qused[q] - cost
    out[#out + 1] = quota_reset(q)
    out[#out + 1] = qend[q] - qstart[q]
  end
  if cap then
    local taken = held + (present and 0 or 1)
    if taken > cap then return nil end
    out[#out + 1] = cap - taken
    out[#out + 1] = (taken >= cap and held > 0) and math.min(1000, soonest - t) or 0
  end
  return out
end

-- each limit's state with nothing charged, whether it admits, and its wait (nil: never)
local function verdicts()
  local out, worst, worst_wait = {}, 0, -2
  local function refuse(index, wait) -- the longest wait wins; "never" beats every wait
    local w = wait == nil and math.huge or wait
    if w > worst_wait then worst, worst_wait = index, w end
  end
  local index = 0
  for w = 1, nw do
    index = index + 1
    local c, limit = wcounter[w], wlimit[w]
    local n, used = nslots[c], total[c]
    local reset = n == 0 and 0 or k0[c] * cwidth[c] + cspan[c] - t
    if used >= limit then
      local wait = nil
      if limit >= 1 and n > 0 then
        local excess, shed = used + 1 - limit, 0
        wait = 0
        for j = 1, n do
          shed = shed + slot(c, j)
          if shed >= excess then wait = (k0[c] + j - 1) * cwidth[c] + cspan[c] - t; break end
        end
      end
      refuse(index, wait)
    end
    out[#out + 1] = math.max(0, limit - used)
    out[#out + 1] = reset
  end
  for l = 1, nl do
    index = index + 1
    local q, limit = lquota[l], llimit[l]
    local reset = math.max(0, quota_reset(q))
    if qused[q] + cost > limit then
      if cost > limit then refuse(index, nil) else refuse(index, reset) end
    end
    out[#out + 1] = math.max(0, limit - qused[q])
    out[#out + 1] = reset
    out[#out + 1] = qend[q] - qstart[q]
  end
  if cap then
    index = index + 1
    local wait = (held >= cap and held > 0) and math.min(1000, soonest - t) or 0
    if held + (present and 0 or 1) > cap then
      if cap >= 1 then refuse(index, wait) else refuse(index, nil) end
    end
    out[#out + 1] = math.max(0, cap - held)
    out[#out + 1] = wait
  end
  return out, worst, worst_wait
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
      local fields, x = {}, 0
      for c = 1, nc do
        local width, n = cwidth[c], nslots[c]
        local k = kt[c]
        local stored
        if n == 0 then
          stored = struct.pack("<dddI4", width, k, 1, 1)
        else
          local hi = k0[c] + n - 1 -- <= k: settled above
          local head = struct.pack("<ddd", width, k0[c], total[c] + 1)
          if hi == k then
            local last = struct.pack(U32, slot(c, n) + 1)
            stored = head .. body[c]:sub(skip[c] + 1, -5) .. last
          else
            stored = head .. slots(c) .. EMPTY:rep(k - hi - 1) .. struct.pack(U32, 1)
          end
        end
        fields[#fields + 1] = cfield[c]
        fields[#fields + 1] = stored
        x = math.max(x, k * width + cspan[c])
      end
      redis.call("HSET", KEYS[1], unpack(fields))
      -- Moved once per slot of the longest window (24 min for a day), not every hit.
      if x > wreach then redis.call("PEXPIRE", KEYS[1], math.max(1, x - t) + pad) end
    end
    if nq > 0 and cost > 0 then
      local fields, x = {}, 0
      local wall_ms = floor(wall_us / 1000)
      for q = 1, nq do
        fields[#fields + 1] = qfield[q]
        fields[#fields + 1] = qpid[q] .. ":" .. (qused[q] + cost)
        x = math.max(x, qend[q] * 1000 + QUOTA_MARGIN_MS)
      end
      redis.call("HSET", KEYS[2], unpack(fields))
      if x > qreach then redis.call("PEXPIRE", KEYS[2], math.max(1, x - wall_ms) + pad) end
    end
    if cap and lease and held == 0 and not releasing then
      -- Every other member has expired or is released now: the set becomes this
      -- lease alone, whose expiry is the latest.
      redis.call("DEL", KEYS[3])
      redis.call("ZADD", KEYS[3], t + lease_ms, lease)
      redis.call("PEXPIRE", KEYS[3], lease_ms + pad)
    else
      if cap and lease then
        redis.call("ZADD", KEYS[3], t + lease_ms, lease)
        redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", t)
        local last = tonumber(redis.call("ZRANGE", KEYS[3], -1, -1, "WITHSCORES")[2])
        redis.call("PEXPIRE", KEYS[3], math.max(1, last - t) + pad)
      end
      forget_released()
    end
    if cost == 0 then forget_stale_quotas() end
    return reply
  end
  forget_stale_quotas()
  forget_released()
  if cap then redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", t) end
  for c = 1, nc do
    if changed[c] and nslots[c] > 0 then
      redis.call("HSET", KEYS[1], cfield[c], packed(c))
    elseif changed[c] then
      redis.call("HDEL", KEYS[1], cfield[c])
    end
  end
end

if not charging then forget_released() end -- a peek writes nothing else
local states, worst, worst_wait = verdicts()
local reply = { charging and 0 or 1, worst_wait == math.huge and -1 or worst_wait, worst }
for j = 1, #states do reply[j + 3] = states[j] end
return reply
