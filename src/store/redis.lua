-- Tollgate's budget and rate-limit store: one script, one atomic step per call.
-- ARGV[1] names the command; each command's arguments and reply are described with it.
-- The rules mirror store::memory::Ledger step for step (see the module doc of store/mod.rs).
--
-- KEYS: four per scope, in request order: rl, leases, lease, reserved; a batch of requests
-- gives each request's scopes in turn (`key_offset` is where the current one's start). Keys built here
-- (period hashes, exactly-once markers) start with the scope's base `<prefix>{<scope>}:`
-- passed in ARGV, so they share the declared keys' hash slot and Redis Cluster accepts them.
--
-- Money is integer nano-USD. Lua numbers are doubles, exact up to 2^53; the Rust side
-- clamps caps and amounts to that bound. Numbers go back to Redis through num() so that no
-- exponent notation ever reaches HINCRBY.

local DAY_MS = 86400000
local MINUTE_US = 60000000
local EXACT = 9007199254740992 -- 2^53
local SETTLED_TTL_MS = 86400000 -- how long settlement stays exactly-once
local IDLE_TTL_MS = 86400000 -- scope state outlives its last lease and rate clock by this
local DAILY_KEEP_MS = 40 * DAY_MS -- a period's spend is kept this long after it ends
local MONTHLY_KEEP_MS = 400 * DAY_MS
local KEYS_PER_SCOPE = 4
-- The scope state's expiry is pushed this far past what is needed, so that it is pushed
-- about once an hour rather than on every admission.
local KEEP_SLACK_MS = 3600000
-- A member every scope-state key holds, so that none is ever emptied (Redis deletes an
-- empty hash or sorted set) and recreated without the shared expiry.
local PLACEHOLDER = '~'

local REFUSED, ADMITTED = 0, 1
local BUDGET, CONCURRENCY, RPM, TPM = 1, 2, 3, 4

-- Integers only (every amount here is one): '%d' formats through a 64-bit integer, exact
-- for these values and far cheaper than a float format; it never writes '-0'.
local function num(x)
  return string.format('%d', x)
end

-- floor(a / b) for integers a >= 0, b > 0: the double division may round up across an
-- integer when a is near 2^53, so the quotient is corrected by one step.
local function quotient(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- Now in ms, and in µs for the rate clocks: whole milliseconds, as the memory store's
-- clock gives them, so that both stores decide alike.
local function clock()
  local t = redis.call('TIME')
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return now_ms, now_ms * 1000
end

-- Calendar: the same algorithms as store::civil_from_days / days_from_civil.
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mm = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mm + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function month_end_ms(y, m)
  if m == 12 then
    y, m = y + 1, 1
  else
    m = m + 1
  end
  return days_from_civil(y, m, 1) * DAY_MS
end

-- A period's id at now_ms and when it ends (nil: never), as Period::window.
local function compute_window(code, now_ms)
  local day = math.floor(now_ms / DAY_MS)
  if code == 'd' then
    return 'd' .. num(day), (day + 1) * DAY_MS
  elseif code == 'm' then
    local y, m = civil_from_days(day)
    return string.format('m%04d%02d', y, m), month_end_ms(y, m)
  end
  return 't', nil
end

-- window(), remembered for the call's clock: a batch asks for the same few many times.
local windows = {}
local function window(code, now_ms)
  local w = windows[code]
  if not w or w.at ~= now_ms then
    local id, ends = compute_window(code, now_ms)
    w = { at = now_ms, id = id, ends = ends }
    windows[code] = w
  end
  return w.id, w.ends
end

-- When a period's spend may be forgotten (nil: never).
local function forget_at_ms(id)
  local kind = string.sub(id, 1, 1)
  if kind == 'd' then
    return (tonumber(string.sub(id, 2)) + 1) * DAY_MS + DAILY_KEEP_MS
  elseif kind == 'm' then
    local y, m = tonumber(string.sub(id, 2, 5)), tonumber(string.sub(id, 6, 7))
    return month_end_ms(y, m) + MONTHLY_KEEP_MS
  end
  return nil
end

-- Extends the life of a scope's four state keys to at least at_ms; never shortens it.
-- They are created and given their expiry together, each with a placeholder so that none
-- is emptied and recreated alone: the expiry of `rl` stands for all four (one PTTL).
local function keep_scope(sc, at_ms, now_ms)
  local ttl = redis.call('PTTL', sc.rl)
  if ttl >= 0 and now_ms + ttl >= at_ms then
    return
  end
  redis.call('HSET', sc.rl, PLACEHOLDER, '')
  redis.call('ZADD', sc.leases, '+inf', PLACEHOLDER)
  redis.call('HSET', sc.lease, PLACEHOLDER, '')
  redis.call('HSET', sc.reserved, PLACEHOLDER, '0')
  local until_ms = num(at_ms + KEEP_SLACK_MS)
  for _, key in ipairs({ sc.rl, sc.leases, sc.lease, sc.reserved }) do
    redis.call('PEXPIREAT', key, until_ms)
  end
end

local function field(key, name)
  return tonumber(redis.call('HGET', key, name)) or 0
end

local function scope_count()
  return #KEYS / KEYS_PER_SCOPE
end

-- Where the current request's keys start in KEYS (requests of a batch follow each other).
local key_offset = 0

local function scope_at(i, base)
  local k = key_offset + (i - 1) * KEYS_PER_SCOPE
  return { base = base, rl = KEYS[k + 1], leases = KEYS[k + 2], lease = KEYS[k + 3], reserved = KEYS[k + 4] }
end

local function period_key(sc, id)
  return sc.base .. 'p:' .. id
end

-- The period's hash, created (with its expiry) on first use like memory's entry().
local function open_period(sc, id)
  local key = period_key(sc, id)
  if redis.call('HSETNX', key, 'spent', '0') == 1 then
    local forget = forget_at_ms(id)
    if forget then
      redis.call('PEXPIREAT', key, num(forget))
    end
  end
  return key
end

-- Adds to a period's settled spend. A result equal to the cost means the field was new or
-- zero, so the hash may have just been created: it gets the period's expiry (the same
-- instant every time, so setting it again changes nothing). Saves an HSETNX per call.
local function add_spent(sc, id, cost)
  local key = period_key(sc, id)
  if redis.call('HINCRBY', key, 'spent', num(cost)) == cost then
    local forget = forget_at_ms(id)
    if forget then
      redis.call('PEXPIREAT', key, num(forget))
    end
  end
end

-- spent + reserved of one period, read once per scope and call (`sc.used` keeps it, and
-- add_reserved keeps it current): each redis.call costs more than the Lua around it.
local function used(sc, id)
  sc.used = sc.used or {}
  local u = sc.used[id]
  if u == nil then
    local spent = redis.call('HGET', period_key(sc, id), 'spent')
    if spent then
      sc.opened = sc.opened or {}
      sc.opened[id] = true -- the period's hash exists, with its expiry
    end
    u = (tonumber(spent) or 0) + field(sc.reserved, id)
    sc.used[id] = u
  end
  return u
end

local function add_reserved(sc, id, delta)
  if redis.call('HINCRBY', sc.reserved, id, num(delta)) <= 0 then
    redis.call('HDEL', sc.reserved, id)
  end
  if sc.used and sc.used[id] then
    sc.used[id] = sc.used[id] + delta
  end
end

-- A lease record: amount|tokens|concurrent|rpm_step_us|tpm_step_us|period,period,...
local function encode_lease(l)
  return table.concat({ num(l.amount), num(l.tokens), l.concurrent and '1' or '0',
    num(l.rpm_step), num(l.tpm_step), table.concat(l.periods, ',') }, '|')
end

local function decode_lease(raw)
  local amount, tokens, concurrent, rpm_step, tpm_step, periods =
    string.match(raw, '^(%d+)|(%d+)|([01])|(%d+)|(%d+)|(.*)$')
  if not amount then
    return nil
  end
  local list = {}
  for id in string.gmatch(periods, '[^,]+') do
    list[#list + 1] = id
  end
  return { amount = tonumber(amount), tokens = tonumber(tokens), concurrent = concurrent == '1',
    rpm_step = tonumber(rpm_step), tpm_step = tonumber(tpm_step), periods = list }
end

-- Removes a lease and returns its record (nil if there was none).
local function take_lease(sc, request_id)
  local raw = redis.call('HGET', sc.lease, request_id)
  redis.call('ZREM', sc.leases, request_id)
  if not raw then
    return nil
  end
  redis.call('HDEL', sc.lease, request_id)
  return decode_lease(raw)
end

-- Gives back what a lease held: its reservation in every period and its in-flight slot.
local function release(sc, l)
  for _, id in ipairs(l.periods) do
    add_reserved(sc, id, -l.amount)
  end
  if l.concurrent and field(sc.rl, 'in_flight') > 0 then
    redis.call('HINCRBY', sc.rl, 'in_flight', -1)
  end
end

-- Releases leases whose time is up.
-- Reads the scope's rate clocks and in-flight count into sc.rate (see rate_state) and
-- returns its lease-expiry hint (below), all in one call.
local function read_rate_state(sc)
  local v = redis.call('HMGET', sc.rl, 'rpm_tat_us', 'tpm_tat_us', 'in_flight', 'next_expiry_ms')
  sc.rate = { tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0 }
  return tonumber(v[4])
end

-- `rl`'s `next_expiry_ms` is a lower bound on the earliest live lease's expiry (absent: no
-- bound known), so most admissions skip the scan: adding a lease lowers it when needed,
-- removing one leaves it a lower bound, and a scan sets it exactly.
local NO_LEASE_MS = EXACT

-- Releases leases whose time is up.
local function expire(sc, now_ms)
  local hint = read_rate_state(sc)
  sc.next_expiry_ms = hint
  if hint and hint > now_ms then
    return
  end
  local due = redis.call('ZRANGEBYSCORE', sc.leases, '-inf', num(now_ms))
  for _, request_id in ipairs(due) do
    local l = take_lease(sc, request_id)
    if l then
      release(sc, l)
    end
  end
  sc.rate = nil -- in-flight counts may have changed
  local first = redis.call('ZRANGE', sc.leases, 0, 0, 'WITHSCORES')
  if not first[1] then
    return -- no scope state yet (or any more): nothing to note, and no key made without expiry
  end
  local next_ms = NO_LEASE_MS
  if first[1] ~= PLACEHOLDER then
    next_ms = math.min(tonumber(first[2]) or 0, NO_LEASE_MS)
  end
  redis.call('HSET', sc.rl, 'next_expiry_ms', num(next_ms))
  sc.next_expiry_ms = next_ms
end

-- GCRA, as memory::gcra: (true, new tat) or (false, µs to wait).
local function gcra(tat, now_us, per_minute, weight)
  local interval = math.floor(MINUTE_US / math.max(per_minute, 1))
  local new_tat = math.max(tat, now_us) + interval * weight
  local ahead = new_tat - now_us
  if ahead <= MINUTE_US then
    return true, new_tat
  end
  return false, ahead - MINUTE_US
end

local function reader(from)
  local i = from - 1
  return function()
    i = i + 1
    return ARGV[i]
  end
end

local function read_budgets(nextarg)
  local budgets = {}
  for j = 1, tonumber(nextarg()) do
    budgets[j] = { period = nextarg(), cap = tonumber(nextarg()), enforcement = nextarg() }
  end
  return budgets
end

local function read_reserve(nextarg, scopes)
  local req = { id = nextarg(), fixed = tonumber(nextarg()), per = tonumber(nextarg()),
    max_out = tonumber(nextarg()), min_out = tonumber(nextarg()), tokens = tonumber(nextarg()),
    requests = tonumber(nextarg()), lease_ms = tonumber(nextarg()), rpm_leases = nextarg() == '1', scopes = {} }
  for i = 1, scopes do
    local sc = scope_at(i, nextarg())
    sc.rpm, sc.tpm, sc.concurrency = tonumber(nextarg()), tonumber(nextarg()), tonumber(nextarg())
    sc.budgets = read_budgets(nextarg)
    req.scopes[i] = sc
  end
  return req
end

-- The scope's rate clocks and in-flight count, read once per scope and request.
local function rate_state(sc)
  if not sc.rate then
    read_rate_state(sc)
  end
  return sc.rate[1], sc.rate[2], sc.rate[3]
end

-- The first rate limit that refuses, as memory::rate_refusal.
local function rate_refusal(req, now_us)
  for i, sc in ipairs(req.scopes) do
    local rpm_tat, tpm_tat, in_flight = rate_state(sc)
    if sc.concurrency and in_flight >= sc.concurrency then
      return { scope = i, kind = CONCURRENCY, budget = 0, value = 0 }
    end
    if sc.rpm then
      local ok, wait = gcra(rpm_tat, now_us, sc.rpm, req.requests)
      if not ok then
        return { scope = i, kind = RPM, budget = 0, value = wait }
      end
    end
    if sc.tpm then
      local ok, wait = gcra(tpm_tat, now_us, sc.tpm, req.tokens)
      if not ok then
        return { scope = i, kind = TPM, budget = 0, value = wait }
      end
    end
  end
  return nil
end

-- The most output tokens that fit in `headroom`, as in memory::affordable_output. With
-- free output, not fitting means the input side alone is too dear: nothing fits.
local function most_output(req, headroom)
  if req.per == 0 then
    return 0
  end
  return quotient(math.max(headroom - req.fixed, 0), req.per)
end

-- The output the enforced budgets afford and whether it was lowered, or a refusal.
local function affordable_output(req, now_ms)
  local output, lowered = req.max_out, false
  for i, sc in ipairs(req.scopes) do
    for j, b in ipairs(sc.budgets) do
      if b.enforcement ~= 'shadow' then
        local u = used(sc, (window(b.period, now_ms)))
        local headroom = math.max(b.cap - u, 0)
        if req.fixed + req.per * output > headroom then
          local most = most_output(req, headroom)
          local clampable = b.enforcement == 'clamp' and req.fixed <= headroom and most >= req.min_out
          if not clampable then
            return nil, false, { scope = i, kind = BUDGET, budget = j, value = u }
          end
          if most < output then
            output, lowered = most, true
          end
        end
      end
    end
  end
  return output, lowered, nil
end

-- Shadow budgets this amount would overrun: {scope, budget, used before}.
local function shadow_refusals(scopes, now_ms, amount)
  local out = {}
  for i, sc in ipairs(scopes) do
    for j, b in ipairs(sc.budgets) do
      if b.enforcement == 'shadow' then
        local u = used(sc, (window(b.period, now_ms)))
        if u + amount > b.cap then
          out[#out + 1] = { i, j, u }
        end
      end
    end
  end
  return out
end

-- Advances one GCRA clock; returns the step taken (0 if it did not pass) and the new tat.
local function advance(sc, name, tat, now_us, per_minute, weight)
  local ok, new_tat = gcra(tat, now_us, per_minute, weight)
  if not ok then
    return 0, tat
  end
  redis.call('HSET', sc.rl, name, num(new_tat))
  return new_tat - math.max(tat, now_us), new_tat
end

-- Reserves `amount` in each budget's period (once per period); appends the budgets' used
-- and returns the periods.
local function reserve_budgets(sc, now_ms, amount, statuses)
  local periods, seen = {}, {}
  for _, b in ipairs(sc.budgets) do
    local id = window(b.period, now_ms)
    if not seen[id] then
      seen[id] = true
      periods[#periods + 1] = id
      if not (sc.opened and sc.opened[id]) then
        open_period(sc, id)
      end
      add_reserved(sc, id, amount)
    end
    statuses[#statuses + 1] = used(sc, id)
  end
  return periods
end

-- Takes the request's rate allowance and in-flight slot, noting the steps in the lease so
-- a rollback can give them back; returns the latest rate clock (µs).
local function take_rate_allowance(req, sc, now_us, lease)
  local rpm_tat, tpm_tat = rate_state(sc)
  if sc.rpm then
    lease.rpm_step, rpm_tat = advance(sc, 'rpm_tat_us', rpm_tat, now_us, sc.rpm, req.requests)
  end
  if sc.tpm then
    lease.tpm_step, tpm_tat = advance(sc, 'tpm_tat_us', tpm_tat, now_us, sc.tpm, req.tokens)
    redis.call('HSET', sc.rl, 'tpm', num(sc.tpm))
  end
  if lease.concurrent then
    redis.call('HINCRBY', sc.rl, 'in_flight', 1)
  end
  return math.max(rpm_tat, tpm_tat)
end

-- Counts the reservation in one scope, as memory::apply; appends its budgets' used.
-- A scope that limits requests per minute only holds nothing a settlement gives back: it
-- gets a lease only when the call asks (a cluster's, whose rollback takes back the step).
local function needs_lease(req, sc)
  return req.rpm_leases or #sc.budgets > 0 or sc.tpm ~= nil or sc.concurrency ~= nil
end

local function apply_scope(req, sc, now_ms, now_us, amount, statuses)
  local expires = now_ms + req.lease_ms
  local lease = { amount = amount, tokens = req.tokens, concurrent = sc.concurrency ~= nil,
    rpm_step = 0, tpm_step = 0, periods = reserve_budgets(sc, now_ms, amount, statuses) }
  local rate_clock_us = take_rate_allowance(req, sc, now_us, lease)
  if not needs_lease(req, sc) then
    keep_scope(sc, math.ceil(rate_clock_us / 1000) + IDLE_TTL_MS, now_ms)
    return
  end
  redis.call('ZADD', sc.leases, num(expires), req.id)
  redis.call('HSET', sc.lease, req.id, encode_lease(lease))
  if not sc.next_expiry_ms or expires < sc.next_expiry_ms then
    redis.call('HSET', sc.rl, 'next_expiry_ms', num(expires))
    sc.next_expiry_ms = expires
  end
  -- Scope state lives while anything in it matters: a live lease or a future rate clock.
  keep_scope(sc, math.max(expires, math.ceil(rate_clock_us / 1000)) + IDLE_TTL_MS, now_ms)
end

local function refused(now_ms, r)
  return { REFUSED, now_ms, r.scope - 1, r.kind, math.max(r.budget - 1, 0), math.min(r.value, EXACT) }
end

local function admitted_reply(now_ms, output, lowered, statuses, shadows)
  local reply = { ADMITTED, now_ms, math.min(output, EXACT), lowered and 1 or 0 }
  for _, u in ipairs(statuses) do
    reply[#reply + 1] = math.min(u, EXACT)
  end
  for _, s in ipairs(shadows) do
    reply[#reply + 1] = s[1] - 1
    reply[#reply + 1] = s[2] - 1
    reply[#reply + 1] = math.min(s[3], EXACT)
  end
  return reply
end

-- One request's admission step, as memory::Ledger::decide.
-- Reply, indexes from 0: {0, now_ms, scope, kind, budget, used or µs to wait}, or
-- {1, now_ms, output, lowered, used of each budget..., scope, budget, used before, ...}
-- with one triple per shadow budget overrun.
local function reserve_one(req, now_ms, now_us)
  -- A budget slice (requests > 1) whose give-back came first (its call was cut off while
  -- still queued, and the give-back was sent): reserving it now would park it until its
  -- lease ends, with nobody to give it back. Refused, it holds nothing.
  if req.requests > 1 and req.scopes[1]
      and redis.call('EXISTS', req.scopes[1].base .. 'done:' .. req.id) == 1 then
    return refused(now_ms, { scope = 1, kind = CONCURRENCY, budget = 0, value = 0 })
  end
  for _, sc in ipairs(req.scopes) do
    expire(sc, now_ms)
  end
  local refusal = rate_refusal(req, now_us)
  if refusal then
    return refused(now_ms, refusal)
  end
  local output, lowered, budget_refusal = affordable_output(req, now_ms)
  if budget_refusal then
    return refused(now_ms, budget_refusal)
  end
  local amount = req.fixed + req.per * output
  local shadows = shadow_refusals(req.scopes, now_ms, amount)
  local statuses = {}
  for _, sc in ipairs(req.scopes) do
    apply_scope(req, sc, now_ms, now_us, math.min(amount, EXACT), statuses)
  end
  return admitted_reply(now_ms, output, lowered, statuses, shadows)
end

-- reserve: a batch of admissions, decided one after the other as separate calls would be.
-- ARGV count; per request: scope count, request_id, fixed, per_output, max_output,
-- min_output, tokens, requests (requests-per-minute steps), lease_ms, rpm_leases (1: a lease for a scope limiting requests
-- per minute only, too); per scope: base, rpm, tpm, concurrency ('' for none),
-- budget count; per budget: period (d|m|t), cap, enforcement (block|clamp|shadow).
-- Reply: one reply of reserve_one per request, in order.
local function reserve_items(nextarg, now_ms, now_us)
  local replies = {}
  for n = 1, tonumber(nextarg()) do
    local scopes = tonumber(nextarg())
    replies[n] = reserve_one(read_reserve(nextarg, scopes), now_ms, now_us)
    key_offset = key_offset + scopes * KEYS_PER_SCOPE
  end
  return replies
end

local function reserve()
  local now_ms, now_us = clock()
  return reserve_items(reader(2), now_ms, now_us)
end

-- Corrects the tokens-per-minute clock by the difference between the reserved and the
-- actual tokens, as memory::Ledger::settle.
local function correct_tpm(sc, l, tokens, now_ms)
  local tpm = tonumber(redis.call('HGET', sc.rl, 'tpm'))
  if not tpm then
    return
  end
  local interval = math.floor(MINUTE_US / math.max(tpm, 1))
  local tat = field(sc.rl, 'tpm_tat_us')
  if tokens >= l.tokens then
    -- Bounded so that num() stays exact: absurd token counts against a tiny limit would
    -- otherwise overflow its 64-bit integer (2^53 µs is centuries: the limit stays shut).
    tat = math.min(tat + (tokens - l.tokens) * interval, EXACT)
  else
    tat = math.max(tat - (l.tokens - tokens) * interval, 0)
  end
  redis.call('HSET', sc.rl, 'tpm_tat_us', num(tat))
  keep_scope(sc, math.ceil(tat / 1000) + IDLE_TTL_MS, now_ms)
end

-- The periods a settlement without a lease counts in: every current period (the lease
-- expired, or the request was admitted while the store was down), so the spend is counted
-- whichever periods the scope's budgets use.
local function current_periods(sc, now_ms)
  local out = {}
  for _, code in ipairs({ 'd', 'm', 't' }) do
    out[#out + 1] = window(code, now_ms)
  end
  return out
end

-- Claims a settlement's exactly-once marker, kept under the first scope of the call: a
-- request is always settled with the same scopes (one call on a single node, for the
-- scopes with a lease; one call per scope in a cluster), so one marker per call is enough.
local function first_settlement(base, request_id)
  return redis.call('SET', base .. 'done:' .. request_id, '1', 'NX', 'PX', SETTLED_TTL_MS)
end

-- Takes back the requests-per-minute steps a budget slice did not use: `of` steps were
-- taken as one (l.rpm_step µs), `unused` of them go back. As memory::unused_step_us.
local function give_back_steps(sc, l, unused, of)
  if of <= 0 or unused <= 0 or l.rpm_step <= 0 then
    return
  end
  local back = math.floor(l.rpm_step / of) * math.min(unused, of)
  redis.call('HSET', sc.rl, 'rpm_tat_us', num(math.max(field(sc.rl, 'rpm_tat_us') - back, 0)))
end

local function settle_scope(sc, request_id, cost, tokens, now_ms, unused, of)
  local l = take_lease(sc, request_id)
  local periods
  if l then
    release(sc, l)
    periods = l.periods
  else
    -- The lease expired first: the spend still happened, in today's periods.
    periods = current_periods(sc, now_ms)
  end
  if cost > 0 then -- a zero-cost settlement (a slice's give-back) opens no period
    for _, id in ipairs(periods) do
      add_spent(sc, id, cost)
    end
  end
  if l then
    correct_tpm(sc, l, tokens, now_ms)
    give_back_steps(sc, l, unused, of)
  end
end

-- settle: a batch of settlements. ARGV count; per settlement: scope count, request_id,
-- cost, tokens, unused and of (a budget slice's unused requests-per-minute steps, of how
-- many; 0 0 for a request), then one base per scope (a single node's settlement leaves out the scopes
-- that got no lease: see needs_lease). Reply: the scopes newly settled, per settlement
-- (all of them, or none when the settlement was already applied).
local function settle_items(nextarg, now_ms)
  local replies = {}
  for n = 1, tonumber(nextarg()) do
    local scopes = tonumber(nextarg())
    local request_id, cost, tokens = nextarg(), tonumber(nextarg()), tonumber(nextarg())
    local unused, of = tonumber(nextarg()), tonumber(nextarg())
    local bases = {}
    for i = 1, scopes do
      bases[i] = nextarg()
    end
    replies[n] = 0
    if scopes > 0 and first_settlement(bases[1], request_id) then
      for i = 1, scopes do
        settle_scope(scope_at(i, bases[i]), request_id, cost, tokens, now_ms, unused, of)
      end
      replies[n] = scopes
    end
    key_offset = key_offset + scopes * KEYS_PER_SCOPE
  end
  return replies
end

local function settle()
  return settle_items(reader(2), (clock()))
end

-- Integers joined by ','.
local function joined(list)
  local out = {}
  for i, v in ipairs(list) do
    out[i] = num(v)
  end
  return table.concat(out, ',')
end

-- batch: settlements, then reservations, in one call (the gateway sends either combined
-- reservations or a batch of settlements, never both: a reservation is on the request path
-- and should not wait for settlement work). ARGV: the settle command's
-- arguments, then the reserve command's (keys in the same order). Reply: one string, settle's
-- reply and then each reservation's reply as integers joined by ',', the lists separated by
-- ';' (the gateway reads one string far more cheaply than nested arrays: store/wire.rs).
local function batch()
  local nextarg = reader(2)
  local now_ms, now_us = clock()
  local parts = { joined(settle_items(nextarg, now_ms)) }
  for _, reply in ipairs(reserve_items(nextarg, now_ms, now_us)) do
    parts[#parts + 1] = joined(reply)
  end
  return table.concat(parts, ';')
end

-- Takes back a GCRA step (never below zero).
local function step_back(sc, name, step)
  if step > 0 then
    redis.call('HSET', sc.rl, name, num(math.max(field(sc.rl, name) - step, 0)))
  end
end

-- release: ARGV request_id, then one base per scope. Undoes a reservation completely
-- (budget, in-flight slot and rate clocks): the rollback of a refused cluster reservation.
local function release_cmd()
  local nextarg = reader(2)
  local request_id = nextarg()
  local released = 0
  for i = 1, scope_count() do
    local sc = scope_at(i, nextarg())
    local l = take_lease(sc, request_id)
    if l then
      release(sc, l)
      step_back(sc, 'rpm_tat_us', l.rpm_step)
      step_back(sc, 'tpm_tat_us', l.tpm_step)
      released = released + 1
    end
  end
  return released
end

-- shrink: ARGV request_id, amount, base, then the scope's budgets. Lowers one scope's
-- reservation to `amount` (a later scope clamped the output further) and replies like an
-- admission of that scope: the budgets' used, then shadow refusals.
local function shrink()
  local nextarg = reader(2)
  local request_id, amount = nextarg(), tonumber(nextarg())
  local sc = scope_at(1, nextarg())
  sc.budgets = read_budgets(nextarg)
  local now_ms = clock()
  local raw = redis.call('HGET', sc.lease, request_id)
  local l = raw and decode_lease(raw)
  if l and l.amount > amount then
    for _, id in ipairs(l.periods) do
      add_reserved(sc, id, amount - l.amount)
    end
    l.amount = amount
    redis.call('HSET', sc.lease, request_id, encode_lease(l))
  end
  local statuses, shadows = {}, {}
  for j, b in ipairs(sc.budgets) do
    local u = used(sc, (window(b.period, now_ms)))
    statuses[j] = u
    if b.enforcement == 'shadow' and u > b.cap then
      shadows[#shadows + 1] = { 1, j, math.max(u - amount, 0) }
    end
  end
  return admitted_reply(now_ms, 0, false, statuses, shadows)
end

-- spent: ARGV base, period code. The settled spend of the current period, as a string.
local function spent()
  local sc = scope_at(1, ARGV[2])
  local now_ms = clock()
  return redis.call('HGET', period_key(sc, (window(ARGV[3], now_ms))), 'spent') or '0'
end

-- window: ARGV now_ms. The daily and monthly ids and ends (tests compare them with Rust).
local function window_cmd()
  local now_ms = tonumber(ARGV[2])
  local d, d_end = window('d', now_ms)
  local m, m_end = window('m', now_ms)
  return { d, num(d_end), m, num(m_end) }
end

local commands = { reserve = reserve, settle = settle, batch = batch, release = release_cmd, shrink = shrink,
  spent = spent, window = window_cmd }
local command = commands[ARGV[1]]
if not command then
  return redis.error_reply('tollgate: unknown command ' .. tostring(ARGV[1]))
end
return command()
