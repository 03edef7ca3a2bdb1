-- Patches behind a base-version guard, for a whole batch (delta.rs writes the arguments).
-- Versions are compared as decimal strings (length first), as in script.lua, so that u64
-- versions above 2^53 stay exact. An absent hash without a tombstone is version 0.
--
-- KEYS: per record its hash and its tombstone.
-- ARGV, once per call: 1 version field, 2 occurred-at field, 3 deleted-flag field.
-- Then per record: version, base, occurredAt ('' if none), the count s of changed fields,
-- s name/value pairs, the count r of removed fields, r names.
-- A record applies when the stored version equals its base: the changed fields are set, the
-- removed ones and the deleted flag removed, the version (and occurredAt) set, a tombstone
-- dropped. A stored version at or above the record's is stale; any other is a gap, which
-- this script never patches over.
-- Returns {applied, the positions (1-based) of the stale records, those of the gaps}.

local KEYS, ARGV, call, unpack = KEYS, ARGV, redis.call, unpack
local vf, of, df = ARGV[1], ARGV[2], ARGV[3]

-- Whether decimal a < decimal b.
local function older(a, b)
  return #a < #b or (#a == #b and a < b)
end

local applied, stale, gaps = 0, {}, {}
local a = 4
for i = 1, #KEYS - 1, 2 do
  local key, tomb = KEYS[i], KEYS[i + 1]
  local ver, base, occurred = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local nset = tonumber(ARGV[a + 3])
  local set_from = a + 4
  local nremove = tonumber(ARGV[set_from + 2 * nset])
  local remove_from = set_from + 2 * nset + 1
  a = remove_from + nremove
  local stored = call('HGET', key, vf)
  local buried = false
  if not stored then
    buried = call('GET', tomb)
    stored = buried or '0'
  end
  if not older(stored, ver) then
    stale[#stale + 1] = (i + 1) / 2
  elseif stored ~= base then
    gaps[#gaps + 1] = (i + 1) / 2
  else
    applied = applied + 1
    -- At most 1,000 pairs per HSET and names per HDEL: unpack() of more exceeds Lua's C stack.
    for s = set_from, set_from + 2 * nset - 1, 2000 do
      call('HSET', key, unpack(ARGV, s, math.min(s + 1999, set_from + 2 * nset - 1)))
    end
    for s = remove_from, remove_from + nremove - 1, 1000 do
      call('HDEL', key, unpack(ARGV, s, math.min(s + 999, remove_from + nremove - 1)))
    end
    call('HDEL', key, df)
    if occurred == '' then
      call('HDEL', key, of)
      call('HSET', key, vf, ver)
    else
      call('HSET', key, vf, ver, of, occurred)
    end
    if buried then call('DEL', tomb) end
  end
end
return {applied, stale, gaps}
