-- The batch script as it was before its arguments got a header: kept, for the tests only, as
-- the oracle the leaner script must agree with (oracle.rs).
--
-- Compare-version-then-write for a whole batch. Versions are compared as decimal strings
-- (length first) so that u64 versions above 2^53 stay exact.
--
-- ARGV[1]: the deleted-flag field. Then per record i (KEYS[2i-1] = hash, KEYS[2i] = tombstone):
--   action ("u" upsert, "d" delete, "m" mark), keep_for_ms, pair count n, then n field/value
--   pairs whose first pair is (version field, version).
-- Returns {applied, stale}.
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- HSET of ARGV[from..to] in slices: unpack() of more than ~8,000 values exceeds Lua's C stack,
-- so a record with many fields is written by several HSETs (all inside this one script).
local SLICE = 2000 -- values (1,000 field/value pairs) per HSET
local function hset(key, from, to)
  for s = from, to, SLICE do
    redis.call('HSET', key, unpack(ARGV, s, math.min(s + SLICE - 1, to)))
  end
end

local df = ARGV[1]
local applied, stale = 0, 0
local a = 2
for i = 1, #KEYS, 2 do
  local key, tomb = KEYS[i], KEYS[i + 1]
  local action, keep, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first, last = a + 3, a + 2 + 2 * n
  local ver = ARGV[first + 1]
  -- A live hash is always newer than any tombstone of its key (an upsert over a tombstone
  -- removes it), so the tombstone is only consulted when there is no hash.
  local current = redis.call('HGET', key, ARGV[first])
  local buried = false
  if not current then
    buried = redis.call('GET', tomb)
    current = buried
  end
  if not current or newer(ver, current) then
    if action == 'u' then
      redis.call('DEL', key)
      hset(key, first, last)
      if buried then redis.call('DEL', tomb) end
    elseif action == 'd' then
      redis.call('DEL', key)
      redis.call('SET', tomb, ver, 'PX', keep)
    else
      redis.call('HSET', key, df, '1')
      hset(key, first, last)
    end
    applied = applied + 1
  else
    stale = stale + 1
  end
  a = last + 1
end
return {applied, stale}
