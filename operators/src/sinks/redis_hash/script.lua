-- Compare-version-then-write for a whole batch. Versions are compared as decimal strings
-- (length first) so that u64 versions above 2^53 stay exact. The layout is script.rs's.
--
-- KEYS: per record its hash and its tombstone; when their count is odd, the last one is the
-- sink's freshness hash.
-- ARGV, once per call: 1 deleted-flag field, 2 version field, 3 occurred-at field,
--   4 replicated_at and 5 the batch's newest occurredAt ('' if none), for the freshness hash,
--   6 the count n of fixed field names, 7..6+n the names.
-- Then per record a head, its action and which values follow ('1' present, '0' absent):
--   'u' o f1..fn  upsert of the fixed fields: version, [occurredAt if o], the present values
--   'p' o         upsert of its own fields: version, [occurredAt], pair count m, m pairs
--   'm' o         mark: version, [occurredAt]
--   'd'           delete: version, keep_for_ms
-- Returns {applied, stale}.
local call, byte, unpack = redis.call, string.byte, unpack
local PRESENT, UPSERT, PAIRS, DELETE = 49, 117, 112, 100 -- '1' 'u' 'p' 'd'

local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- `command` over t[1..n] in slices: unpack() of more than ~8,000 values exceeds Lua's C
-- stack, so a record with many fields takes several calls (all inside this one script).
local SLICE = 2000 -- values (1,000 field/value pairs) per call
local function sliced(command, key, t, n)
  local total = 0
  for s = 1, n, SLICE do
    total = total + call(command, key, unpack(t, s, math.min(s + SLICE - 1, n)))
  end
  return total
end

-- Makes the pairs t[1..n] all that the hash holds. Written over the hash as it is, which
-- leaves it right when it held no other fields (the usual update, or a new key); else the
-- fields the record leaves absent (absent[1..g]) are deleted; and if a field nobody knows is
-- left even then (a field dropped from the projection, a foreign hash), from scratch.
local function replace(key, t, n, absent, g)
  sliced('HSET', key, t, n)
  local len = call('HLEN', key)
  if len == n / 2 or len - sliced('HDEL', key, absent, g) == n / 2 then return end
  call('DEL', key)
  sliced('HSET', key, t, n)
end

local df, vf, of = ARGV[1], ARGV[2], ARGV[3]
local nfixed = tonumber(ARGV[6])
-- `full` holds every name of a record with all fixed fields present, so that only its values
-- are filled in; `complete` is that record's head.
local names, full = {}, {vf, false, of, false}
for j = 1, nfixed do
  names[j] = ARGV[6 + j]
  full[3 + 2 * j] = names[j]
end
local complete = 'u1' .. string.rep('1', nfixed)
local only_df = {df}
local buf, gone = {}, {}

local applied, stale = 0, 0
local a = 7 + nfixed
for i = 1, #KEYS - 1, 2 do
  local key, tomb = KEYS[i], KEYS[i + 1]
  local head, ver = ARGV[a], ARGV[a + 1]
  -- A live hash is always newer than any tombstone of its key (an upsert over a tombstone
  -- removes it), so the tombstone is only consulted when there is no hash.
  local current = call('HGET', key, vf)
  local buried = false
  if not current then
    buried = call('GET', tomb)
    current = buried
  end
  local fresh = not current or newer(ver, current)
  if fresh then applied = applied + 1 else stale = stale + 1 end
  local kind = byte(head, 1)
  if kind == DELETE then
    if fresh then
      call('DEL', key)
      call('SET', tomb, ver, 'PX', ARGV[a + 2])
    end
    a = a + 3
  elseif head == complete then
    if fresh then
      full[2], full[4] = ver, ARGV[a + 2]
      for j = 1, nfixed do full[4 + 2 * j] = ARGV[a + 2 + j] end
      replace(key, full, 4 + 2 * nfixed, only_df, 1)
      if buried then call('DEL', tomb) end
    end
    a = a + 3 + nfixed
  elseif kind == UPSERT then
    local v = a + 2
    if fresh then
      local n, g = 2, 0
      buf[1], buf[2] = vf, ver
      if byte(head, 2) == PRESENT then
        buf[3], buf[4], n, v = of, ARGV[v], 4, v + 1
      else
        g, gone[1] = 1, of
      end
      for j = 1, nfixed do
        if byte(head, 2 + j) == PRESENT then
          buf[n + 1], buf[n + 2], n, v = names[j], ARGV[v], n + 2, v + 1
        else
          g = g + 1
          gone[g] = names[j]
        end
      end
      -- An upsert clears the flag of `mode: mark`.
      g = g + 1
      gone[g] = df
      replace(key, buf, n, gone, g)
      if buried then call('DEL', tomb) end
    else
      for k = 2, #head do
        if byte(head, k) == PRESENT then v = v + 1 end
      end
    end
    a = v
  else
    local n, v = 2, a + 2
    buf[1], buf[2] = vf, ver
    if byte(head, 2) == PRESENT then
      buf[3], buf[4], n, v = of, ARGV[v], 4, v + 1
    end
    if kind == PAIRS then
      local last = v + 2 * tonumber(ARGV[v])
      if fresh then
        for k = v + 1, last do
          n = n + 1
          buf[n] = ARGV[k]
        end
        call('DEL', key)
        sliced('HSET', key, buf, n)
        if buried then call('DEL', tomb) end
      end
      a = last + 1
    else
      if fresh then call('HSET', key, df, '1', unpack(buf, 1, n)) end
      a = v
    end
  end
end
-- Best effort, as the batch is what counts: a freshness key of another type fails only this.
if #KEYS % 2 == 1 then
  local freshness = KEYS[#KEYS]
  if ARGV[5] == '' then
    redis.pcall('HSET', freshness, 'replicated_at', ARGV[4])
  else
    redis.pcall('HSET', freshness, 'replicated_at', ARGV[4], 'newest_occurred_at', ARGV[5])
  end
end
return {applied, stale}
