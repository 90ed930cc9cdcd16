-- The wrk side of the benchmark (bench/run.py runs it; see bench/README.md).
--
--   wrk -t2 -c50 -d10s --latency -s bench/wrk.lua http://127.0.0.1:PORT -- MODE USERS_FILE
--
-- MODE is one of: list, get, create, toggle, mixed, unauthenticated.
-- USERS_FILE has one line per user: "<user id> <HS256 token> [<task id>,<task id>,...]".
--
-- Every request picks a random user (and, for get/toggle/update, a random task of that user).
-- The requests are formatted once in init(), as wrk's scripting guide recommends, so request()
-- costs one table lookup. response() counts the status codes; done() prints one line,
-- "BENCH_JSON {...}", with the rate, the latency percentiles and the errors.

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_number", thread_count)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
local lists, gets, creates, toggles, updates, anonymous = {}, {}, {}, {}, {}, {}
local pick

local function split_ids(text)
  local ids = {}
  for id in string.gmatch(text or "", "%d+") do
    ids[#ids + 1] = id
  end
  return ids
end

local function random_of(items)
  return items[math.random(#items)]
end

function init(args)
  mode = args[1]
  local path = args[2]
  statuses = {}
  local serial = 0
  for line in io.lines(path) do
    local user_id, token, ids = string.match(line, "^(%S+) (%S+) ?(%S*)$")
    if user_id then
      serial = serial + 1
      local base = "/api/" .. user_id .. "/tasks"
      local auth = { ["Authorization"] = "Bearer " .. token }
      local json = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
      lists[#lists + 1] = wrk.format("GET", base, auth)
      anonymous[#anonymous + 1] = wrk.format("GET", base, {})
      -- A few distinct titles per user: the body varies, its size hardly.
      for k = 1, 3 do
        creates[#creates + 1] = wrk.format(
          "POST", base, json, '{"title": "Benchmark task ' .. serial .. "-" .. k .. '"}'
        )
      end
      for _, id in ipairs(split_ids(ids)) do
        gets[#gets + 1] = wrk.format("GET", base .. "/" .. id, auth)
        toggles[#toggles + 1] = wrk.format("PATCH", base .. "/" .. id .. "/complete", auth)
        updates[#updates + 1] = wrk.format(
          "PATCH", base .. "/" .. id, json, '{"title": "Renamed by the benchmark ' .. id .. '"}'
        )
      end
    end
  end
  if #lists == 0 then
    error("no users in " .. tostring(path))
  end
  if (mode == "get" or mode == "toggle" or mode == "mixed") and #gets == 0 then
    error(mode .. " needs task ids in " .. tostring(path))
  end

  if mode == "list" then
    pick = function() return random_of(lists) end
  elseif mode == "get" then
    pick = function() return random_of(gets) end
  elseif mode == "create" then
    pick = function() return random_of(creates) end
  elseif mode == "toggle" then
    pick = function() return random_of(toggles) end
  elseif mode == "unauthenticated" then
    pick = function() return random_of(anonymous) end
  elseif mode == "mixed" then
    -- 80% reads (40 list, 40 get), 15% create/toggle (7.5 each), 5% update (PATCH a title).
    -- Updates rather than deletes: the ids the other requests use stay valid.
    pick = function()
      local r = math.random(1000)
      if r <= 400 then return random_of(lists) end
      if r <= 800 then return random_of(gets) end
      if r <= 875 then return random_of(creates) end
      if r <= 950 then return random_of(toggles) end
      return random_of(updates)
    end
  else
    error("unknown mode " .. tostring(mode))
  end

  math.randomseed(os.time() * 100 + (thread_number or 0) * 7919)
  for _ = 1, 10 do
    math.random()
  end
end

function request()
  return pick()
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local function is_expected(mode_name, status)
  if mode_name == "unauthenticated" then
    return status == 401
  end
  return status >= 200 and status < 300
end

function done(summary, latency, requests)
  local totals = {}
  local unexpected = 0
  local mode_name = nil
  for _, thread in ipairs(threads) do
    mode_name = mode_name or thread:get("mode")
    local counted = thread:get("statuses") or {}
    for status, count in pairs(counted) do
      totals[status] = (totals[status] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(totals) do
    parts[#parts + 1] = string.format('"%d": %d', status, count)
    if not is_expected(mode_name, status) then
      unexpected = unexpected + count
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"mode": "%s", "requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p95": %d, "p99": %d, "max": %d, "mean": %.1f}, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d, "status_over_399": %d}, '
      .. '"unexpected_status": %d, "statuses": {%s}}\n',
    tostring(mode_name), summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status,
    unexpected, table.concat(parts, ", ")
  ))
end
