-- Compare-version-then-write for a whole batch. Versions are compared as decimal strings
-- (length first) so that u64 versions above 2^53 stay exact.
--
-- ARGV[1..3]: version field, occurredAt field, deleted field.
-- Then per record i (KEYS[2i-1] = hash, KEYS[2i] = tombstone):
--   action ("u" upsert, "d" delete, "m" mark), version, keep_for_ms, occurredAt ("" if none),
--   field count n, then n field/value pairs.
-- Returns {applied, stale}.
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

local vf, of, df = ARGV[1], ARGV[2], ARGV[3]
local applied, stale = 0, 0
local a = 4
for i = 1, #KEYS, 2 do
  local key, tomb = KEYS[i], KEYS[i + 1]
  local action, ver, keep, occ = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local n = tonumber(ARGV[a + 4])
  local current = redis.call('HGET', key, vf)
  local buried = redis.call('GET', tomb)
  if buried and (not current or newer(buried, current)) then current = buried end
  if not current or newer(ver, current) then
    if action == 'u' then
      local args = {vf, ver}
      if occ ~= '' then args[#args + 1] = of; args[#args + 1] = occ end
      for j = 1, n do
        args[#args + 1] = ARGV[a + 3 + 2 * j]
        args[#args + 1] = ARGV[a + 4 + 2 * j]
      end
      redis.call('DEL', key)
      redis.call('HSET', key, unpack(args))
      if buried then redis.call('DEL', tomb) end
    elseif action == 'd' then
      redis.call('DEL', key)
      redis.call('SET', tomb, ver, 'PX', keep)
    else
      if occ ~= '' then
        redis.call('HSET', key, vf, ver, df, '1', of, occ)
      else
        redis.call('HSET', key, vf, ver, df, '1')
      end
    end
    applied = applied + 1
  else
    stale = stale + 1
  end
  a = a + 5 + 2 * n
end
return {applied, stale}
