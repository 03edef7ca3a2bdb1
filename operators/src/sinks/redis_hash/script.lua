-- Compare-version-then-write for a whole batch. Versions are compared as decimal strings
-- (length first) so that u64 versions above 2^53 stay exact. The layout is script.rs's.
--
-- A template: script.rs writes the header's names in, one script per header size (at the
-- lines `--{names}` and `--{write_complete}`), so that a complete record's write names its
-- values one by one, which costs Redis less than a table filled and unpacked per record.
--
-- KEYS: per record its hash and its tombstone; when their count is odd, the last one is the
-- sink's freshness hash.
-- ARGV, once per call: 1 deleted-flag field, 2 version field, 3 occurred-at field, 4 the count
--   n of fixed field names, 5..4+n the names; with the freshness hash, then replicated_at and
--   the batch's newest occurredAt ('' if none).
-- Then the records' values, in order, in packs: MessagePack arrays of strings (pack.rs), as
-- many as it takes; a record's values are all in one. Per record a head, its action and what
-- follows:
--   'U'           upsert of the named fixed fields, all present: version, occurredAt, n values
--   'u' o f1..fn  upsert of the named fixed fields, o and each f '1' (present) or '0'
--                 (absent): version, [occurredAt], the present values
--   'F'           upsert of a fixed set of fields, by name: pair count m, then m name/value
--                 pairs, version first, then occurredAt if any, then the present fields
--   'P'           upsert of its own fields (payload, include): as 'F'
--   'M' or 'm'    mark, with occurredAt or without: version, [occurredAt]
--   'd'           delete: version, keep_for_ms
-- Returns {applied, stale, the positions (1-based, in this call) of the stale records, or false
-- (nil to the client) when none was}.
--
-- The fixed fields of one set are written over the hash, which the hash's field count then
-- shows right or not: dropping the hash first costs more. A call on a cluster often holds a
-- single record, so what a call costs besides its records counts too: the functions use no
-- upvalues (each is allocated per call).

-- unpack() of more than ~8,000 values exceeds Lua's C stack: this many values (1,000
-- field/value pairs) at most go to one command, a record with more takes several.
local SLICE = 2000

-- `command` over t[from..to] in slices of SLICE values (written out: an upvalue costs); the
-- sum of the replies.
local function sliced(command, key, t, from, to)
  local total = 0
  for s = from, to, 2000 do
    total = total + redis.call(command, key, unpack(t, s, math.min(s + 1999, to)))
  end
  return total
end

-- The fields an upsert of the named fixed fields with head `head` leaves absent (ARGV[5..]
-- are the names): the names it lacks, the occurred-at field if it lacks that, and the
-- deleted flag of `mode: mark`.
local function absent(head, deleted, occurred_at, nfixed)
  if head == 'U' then return {deleted}, 1, 1 end
  local gone, g = {}, 0
  if string.byte(head, 2) ~= 49 then g, gone[1] = 1, occurred_at end
  for j = 1, nfixed do
    if string.byte(head, 2 + j) ~= 49 then
      g = g + 1
      gone[g] = ARGV[4 + j]
    end
  end
  g = g + 1
  gone[g] = deleted
  return gone, 1, g
end

-- Locals, not globals, in the loop: a global is a table lookup each time.
local KEYS, ARGV, call, byte, unpack, unpack_pack = KEYS, ARGV, redis.call, string.byte, unpack,
  cmsgpack.unpack
local PRESENT = 49 -- '1'
local df, vf, of = ARGV[1], ARGV[2], ARGV[3]
local nfixed = tonumber(ARGV[4])
-- The header's names as locals F1, F2, ... (ARGV[5], ARGV[6], ...), for `write_complete`.
--{names}
local freshness = #KEYS % 2 == 1
-- The pairs of a 'u' record.
local buf

-- Stale records are rare (version_filter drops most first): their table is made for the first.
local applied, stale, stale_at = 0, 0, false
-- R is the pack being read, ARGV[p], of `packed` values; a is the next record's first in it.
local p = 5 + nfixed + (freshness and 2 or 0)
local R = unpack_pack(ARGV[p])
local packed, a = #R, 1
for i = 1, #KEYS - 1, 2 do
  if a > packed then
    p = p + 1
    R = unpack_pack(ARGV[p])
    packed, a = #R, 1
  end
  local key, tomb, head = KEYS[i], KEYS[i + 1], R[a]
  -- Heads compare as strings (one instruction: Lua strings are interned), but for 'u'.
  local by_name = head == 'F' or head == 'P'
  local ver = R[by_name and a + 3 or a + 1]
  -- A live hash is always newer than any tombstone of its key (an upsert over a tombstone
  -- removes it), so the tombstone is only consulted when there is no hash.
  local current = call('HGET', key, vf)
  local buried = false
  if not current then
    buried = call('GET', tomb)
    current = buried
  end
  local fresh = not current or #ver > #current or (#ver == #current and ver > current)
  if fresh then
    applied = applied + 1
  else
    stale = stale + 1
    stale_at = stale_at or {}
    stale_at[stale] = (i + 1) / 2
  end
  if by_name then
    local first, last = a + 2, a + 1 + 2 * tonumber(R[a + 1])
    if fresh then
      if head == 'P' then call('DEL', key) end
      local n = last - first + 1
      if n <= SLICE then call('HSET', key, unpack(R, first, last)) else sliced('HSET', key, R, first, last) end
      -- Fields a fixed set leaves absent, or nobody knows: from scratch.
      if head == 'F' and call('HLEN', key) ~= n / 2 then
        call('DEL', key)
        sliced('HSET', key, R, first, last)
      end
      if buried then call('DEL', tomb) end
    end
    a = last + 1
  elseif head == 'd' then
    if fresh then
      call('DEL', key)
      call('SET', tomb, ver, 'PX', R[a + 2])
    end
    a = a + 3
  elseif head == 'M' or head == 'm' then
    if fresh then
      if head == 'M' then
        call('HSET', key, df, '1', vf, ver, of, R[a + 2])
      else
        call('HSET', key, df, '1', vf, ver)
      end
    end
    a = a + (head == 'M' and 3 or 2)
  else
    local complete, v = head == 'U', a + 2
    if fresh then
      local n
      if complete then
        -- The version, occurredAt and each named field, R[a + 2 + j] the value of Fj:
        -- call('HSET', key, vf, ver, of, R[a + 2], F1, R[a + 3], F2, R[a + 4], ...)
        --{write_complete}
        n, v = 4 + 2 * nfixed, v + 1 + nfixed
      else
        buf = buf or {}
        buf[1], buf[2], n = vf, ver, 2
        if byte(head, 2) == PRESENT then
          buf[3], buf[4], n, v = of, R[v], 4, v + 1
        end
        for j = 1, nfixed do
          if byte(head, 2 + j) == PRESENT then
            buf[n + 1], buf[n + 2], n, v = ARGV[4 + j], R[v], n + 2, v + 1
          end
        end
        -- At most 100 values: a header names at most 48 fields (script.rs).
        call('HSET', key, unpack(buf, 1, n))
      end
      -- Written over the hash as it is, which leaves it right when it held no other fields
      -- (the usual update, or a new key); else the fields the record leaves absent go; and if
      -- a field nobody knows is left even then (one dropped from the projection, a foreign
      -- hash), it is written from scratch.
      local len = call('HLEN', key)
      if len ~= n / 2 and len - sliced('HDEL', key, absent(head, df, of, nfixed)) ~= n / 2 then
        call('DEL', key)
        if complete then
          --{write_complete}
        else
          call('HSET', key, unpack(buf, 1, n))
        end
      end
      if buried then call('DEL', tomb) end
    elseif complete then
      v = v + 1 + nfixed
    else
      for k = 2, #head do
        if byte(head, k) == PRESENT then v = v + 1 end
      end
    end
    a = v
  end
end
-- Best effort, as the batch is what counts: a freshness key of another type fails only this.
if freshness then
  local at = 5 + nfixed
  if ARGV[at + 1] == '' then
    redis.pcall('HSET', KEYS[#KEYS], 'replicated_at', ARGV[at])
  else
    redis.pcall('HSET', KEYS[#KEYS], 'replicated_at', ARGV[at], 'newest_occurred_at', ARGV[at + 1])
  end
end
return {applied, stale, stale_at}
