"""The Lua script behind every budget round trip (one call per home slot per sync).

SYNC, in one atomic step, for one sidecar:

1. idempotency: `seq` must grow (a late copy of an older call is ignored) and a
   flush `batch` number already applied is not applied again (a retry after a
   timeout whose first attempt did run). A replay of a stopped process's
   spend from its journal (`journal.py`) sends seq 0: only the batch number
   counts, so a batch that process did write is not written twice;
2. the epoch key: created when missing, returned so the sidecar can tell that
   Redis lost its data;
3. the kill switch of every budget in the call: 1 suspended, 0 known not to
   be, -1 unknown (Redis lost it: the sidecar keeps what it knew, and a budget
   the sidecar holds suspended gets no lease either way);
4. per meter: after Redis lost its history, take back the spend the sidecars
   last saw (`seed`, windows only, once per meter and epoch: the largest seed
   counts); drop expired leases (a dead sidecar's reservations return to the
   pool), refill a bucket from Redis `TIME`, apply the batch's settled spend
   (window: `spent += d`; bucket: consumed tokens leave the lease), then set this
   sidecar's lease: shrink to `want`, or grow towards `want` by at most
   `frac * unleased / holders` (more when a waiting request `need`s it and it is
   there), never below `floor` (what the sidecar has already promised to
   requests in flight), nothing above `floor` when the budget is suspended;
   after an outage, what the sidecars not yet back may have spent of their
   failOpen allowances (`owe`, from the first call back's `po`) is not leased
   until each has called or `owe_ms` has passed;
5. the batch's spend records appended to the ledger stream, and its quarantined
   records (ones the codec had to alter) to the quarantine stream (MINID trimming by age).

The payload is JSON (ARGV[1]); keys are passed in KEYS and referred to by index.
Integers up to 2^53 survive cjson and Lua numbers exactly; every integer written
back goes through string.format('%d').
"""

SYNC = r"""
local p = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function int(v) return string.format('%d', math.floor(v)) end

local sk = KEYS[p.sk]
local last = redis.call('HMGET', sk, 'seq', 'batch')
-- seq 0: a replay of spend a stopped process left on disk (its batch numbers still apply)
if p.seq > 0 and p.seq <= (tonumber(last[1]) or -1) then
  return {'stale', '', now, {}, {}}
end
local dup = false
if p.batch > 0 then
  if p.batch <= (tonumber(last[2]) or 0) then
    dup = true
  else
    redis.call('HSET', sk, 'batch', int(p.batch))
  end
end
if p.seq > 0 then redis.call('HSET', sk, 'seq', int(p.seq)) end
redis.call('PEXPIRE', sk, p.sk_ttl)

local ek = KEYS[p.ek]
local epoch = redis.call('GET', ek)
if not epoch then
  epoch = p.epoch_new
  redis.call('SET', ek, epoch)
end
-- this sidecar's readings come from a history Redis no longer has
local lost = p.ek_known ~= nil and p.ek_known ~= '' and p.ek_known ~= epoch

if p.bi then
  if #p.new_budgets > 0 then redis.call('SADD', KEYS[p.bi], unpack(p.new_budgets)) end
  redis.call('PEXPIRE', KEYS[p.bi], p.ix_ttl)
end

-- the kill switch: 1 suspended, 0 known not suspended, -1 unknown (no flag and no
-- `known` key: Redis may have lost it; the sidecar keeps what it knew)
local susp = {}
local suspended = {}
for i, b in ipairs(p.budgets) do
  local s = redis.call('EXISTS', KEYS[b[2]])
  if s == 0 and redis.call('EXISTS', KEYS[b[4]]) == 0 then s = -1 end
  susp[i] = s
  suspended[b[1]] = (s == 1) or (b[5] == 1)
  redis.call('ZREMRANGEBYSCORE', KEYS[b[3]], '-inf', now)
end

local out = {}
for i, m in ipairs(p.meters) do
  local h = KEYS[m.h]
  local x = KEYS[m.x]
  local me = 'L:' .. p.sid
  local f = redis.call('HMGET', h, 'spent', 'level', 'ts', 'leased', me, 'ep', 'born', 'seed', 'owe', 'owe_until')
  local bucket = (m.kind == 'bucket')
  local spent = tonumber(f[1]) or 0
  local leased = tonumber(f[4]) or 0
  local cur = tonumber(f[5]) or 0
  local level = 0
  if bucket then
    level = tonumber(f[2])
    local ts = tonumber(f[3]) or now
    if level == nil then
      level = m.limit - leased
    elseif now > ts then
      level = level + (now - ts) * m.refill
    end
  end
  -- leases whose holder stopped renewing them: back to the pool, never counted as spend
  local expired = redis.call('ZRANGEBYSCORE', x, '-inf', now)
  for _, who in ipairs(expired) do
    local field = 'L:' .. who
    local amt = tonumber(redis.call('HGET', h, field)) or 0
    redis.call('HDEL', h, field)
    leased = leased - amt
    if bucket then level = level + amt end
    if who == p.sid then cur = 0 end
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', x, '-inf', now) end
  if bucket and level > m.limit - leased then level = m.limit - leased end
  -- born: the epoch this hash was first written in ('' if it outlived an epoch change). A
  -- window born in this epoch takes back what a sidecar that read it before Redis lost its
  -- history saw spent (`seed`, sent with every call; used only when the call's `ek_known`
  -- is an older epoch; the largest seed counts), so an empty restart does not hand the
  -- budget out a second time.
  local born = f[7]
  if not f[6] then born = epoch elseif f[6] ~= epoch then born = '' end
  if lost and m.seed and m.seed > 0 and not bucket and born == epoch then
    local had = tonumber(f[8]) or 0
    if m.seed > had then
      spent = spent + (m.seed - had)
      redis.call('HSET', h, 'seed', int(m.seed))
    end
  end
  -- owe: what the sidecars not yet back from an outage may have spent of their failOpen
  -- allowances, kept out of the room until they say (or `owe_ms` passes). The first call
  -- back sets it to the most the others may have spent (`po[2]`); each later one takes
  -- its own share (`po[1]`) off, its spend being in `d`.
  local owe = tonumber(f[9]) or 0
  local owe_until = tonumber(f[10]) or 0
  local owe_was = owe
  if now >= owe_until then owe = 0 end
  if m.po then
    if now >= owe_until then
      owe = m.po[2]
      owe_until = now + p.owe_ms
    else
      owe = owe - m.po[1]
    end
    if owe < 0 then owe = 0 end
  end
  if owe ~= owe_was or m.po then redis.call('HSET', h, 'owe', int(owe), 'owe_until', int(owe_until)) end
  -- settled spend of this batch: covered by the lease first, the rest is overage
  if m.d > 0 and not dup then
    local covered = math.min(m.d, cur)
    cur = cur - covered
    leased = leased - covered
    if bucket then
      level = level - (m.d - covered)
    else
      spent = spent + m.d
    end
  end
  local room
  if bucket then room = level - owe else room = m.limit - spent - leased - owe end
  if room < 0 then room = 0 end
  local new = cur
  if suspended[m.b] then
    new = 0
  elseif m.want <= cur then
    new = m.want
  else
    local holders = redis.call('ZCARD', x)
    if not redis.call('ZSCORE', x, p.sid) then holders = holders + 1 end
    local cap = math.floor(p.frac * room / holders)
    -- requests are waiting: give them what they need if it is there, else all that is
    -- left as long as at least the smallest of them fits (a burst at the end of a budget)
    local needx = m.need - cur
    if needx > cap then
      if needx <= room then
        cap = needx
      elseif m.nmin > 0 and m.nmin - cur <= room then
        cap = room
      end
    end
    new = cur + math.min(m.want - cur, cap, room)
  end
  if new < m.floor then new = m.floor end
  local dl = new - cur
  leased = leased + dl
  local exp
  if bucket then
    level = level - dl
    if m.refill > 0 then
      exp = now + math.ceil(math.max(m.limit - level, 0) / m.refill) + 2 * p.ttl + p.grace
    else
      exp = now + p.ix_ttl
    end
    redis.call('HSET', h, 'level', int(level), 'ts', int(now), 'refill_per_ms', tostring(m.refill))
  else
    exp = m.exp
    redis.call('HSET', h, 'spent', int(spent), 'period', m.period, 'period_end', int(m.pend))
  end
  redis.call('HSET', h, 'leased', int(leased), 'limit', int(m.limit), 'kind', m.kind, 'unit', m.unit,
    'scale', int(m.scale), 'label', m.label, 'budget', m.b, 'meter', m.k, 'updated_ms', int(now),
    'ep', epoch, 'born', born)
  if new > 0 then
    redis.call('HSET', h, me, int(new))
    redis.call('ZADD', x, now + p.ttl, p.sid)
  else
    redis.call('HDEL', h, me)
    redis.call('ZREM', x, p.sid)
  end
  redis.call('PEXPIREAT', h, int(exp))
  redis.call('PEXPIREAT', x, int(exp))
  redis.call('ZADD', KEYS[m.ix], int(exp), m.k)
  redis.call('PEXPIRE', KEYS[m.ix], p.ix_ttl)
  local total
  if bucket then total = level else total = spent end
  out[i] = {int(new), int(total), int(leased), redis.call('ZCARD', x)}
end

-- The ledger and its quarantine: the same append, trimmed to the retention. A ledger entry
-- carries `rid` (sidecar/batch/index): the same record re-sent after Redis lost its data
-- (the batch it was in never confirmed) has the same rid, which the ledger sink keys its rows on.
local function append(k, recs, ids)
  if k == 0 or dup then return end
  local minid = int(now - p.keep_ms) .. '-0'
  for i, r in ipairs(recs) do
    if ids then
      r[#r + 1] = 'rid'
      r[#r + 1] = p.sid .. '/' .. int(p.batch) .. '/' .. int(i - 1)
    end
    redis.call('XADD', KEYS[k], 'MINID', '~', minid, '*', unpack(r))
  end
end
append(p.lk, p.recs, true)
append(p.qk, p.qrecs, false)

local status = 'ok'
if dup then status = 'dup' end
return {status, epoch, now, susp, out}
"""
