-- Feed wrk with pre-generated requests, one per line, for bench/webhooks.py.
--
--   wrk -t T -c C -d D --latency -s bench/wrk_feed.lua URL -- METHOD PATH PREFIX OFFSETS WRAP RATE QUOTAS
--
-- Thread i (0-based) reads only its own file, PREFIX.i, so no two threads (and, as a thread hands
-- its lines out one request at a time, no two connections) ever send the same line. A file's first
-- line names the per-request headers, tab-separated; every other line holds one request: the values
-- of those headers, then the body, tab-separated. Lines are read as requests are made (the memory
-- used does not grow with the file).
--
--   OFFSETS  comma-separated byte offset per thread to resume at (0: the first request), so that
--            successive runs against one target never repeat a request
--   WRAP     1: start the file over at its end (baselines); 0: never repeat a line; at the end of the
--            file, count the shortfall ("exhausted") and send GET /healthz instead
--   RATE     requests per second for this thread (0: as fast as the server answers); paced with
--            wrk's delay() hook on a fixed schedule: a request a slow answer held back is sent as soon
--            as a connection is free (open-loop, as Plivo sends whatever our latency), so the rate
--            offered is exact and one the server cannot take shows as fewer answers
--   QUOTAS   comma-separated requests per thread (-1: unlimited); a thread that has sent its quota
--            stops itself (the process still runs until wrk's duration ends or it gets SIGINT)
--
-- done() prints one line, "WRK_RESULT {json}", with wrk's summary, the latency percentiles and, per
-- thread, the requests sent, the 2xx and other answers counted, the shortfall and the resume offset.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
end

local function split(text, sep)
  local parts = {}
  for part in (text .. sep):gmatch("(.-)" .. sep) do
    parts[#parts + 1] = part
  end
  return parts
end

-- The n header values and the body of a request line (plain find: cheaper than patterns per request).
local function fields_of(line, n)
  local fields, start = {}, 1
  for i = 1, n do
    local tab = line:find("\t", start, true)
    fields[i] = line:sub(start, tab - 1)
    start = tab + 1
  end
  fields[n + 1] = line:sub(start)
  return fields
end

-- Main state: number the threads and keep them for done() ---------------------------------------

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  threads[#threads + 1] = thread
end

-- Thread state -----------------------------------------------------------------------------------

tid = 0
sent, ok, failed, exhausted, pos = 0, 0, 0, 0, 0
local file, names, data_start, wrap, quota, method, path, filler

function init(args)
  method, path = args[1], args[2]
  local prefix = args[3]
  local offset = tonumber(split(args[4], ",")[tid + 1])
  wrap = args[5] == "1"
  local rate = tonumber(args[6])
  quota = tonumber(split(args[7], ",")[tid + 1])
  filler = wrk.format("GET", "/healthz", {}, nil)

  file = assert(io.open(prefix .. "." .. tid, "rb"))
  local header = file:read("*l")
  names = header == "" and {} or split(header, "\t")
  data_start = #header + 1
  pos = offset > 0 and offset or data_start
  file:seek("set", pos)

  if rate > 0 then
    local interval = 1000 / rate
    local next_at = nil
    -- Defined only in paced runs: wrk checks for delay() after init(), and an unpaced run should not
    -- go through wrk's timer for every request.
    delay = function()
      local t = now_ms()
      next_at = (next_at or t) + interval
      return math.max(0, math.floor(next_at - t))
    end
  end
end

local function next_line()
  local line = file:read("*l")
  if line == nil and wrap and pos > data_start then
    file:seek("set", data_start)
    pos = data_start
    line = file:read("*l")
  end
  if line ~= nil then
    pos = pos + #line + 1
  end
  return line
end

-- The request for one line: wrk's own headers (-H, Host), the line's headers, its body.
local function build(line)
  local fields = fields_of(line, #names)
  local headers = {}
  for name, value in pairs(wrk.headers) do -- wrk.format() adds them only when given no headers
    headers[name] = value
  end
  for i, name in ipairs(names) do
    headers[name] = fields[i]
  end
  return wrk.format(method, path, headers, fields[#names + 1])
end

-- Before the run, wrk calls thread 0's request() once to check it (script_verify_request); that line
-- is kept and sent again as the thread's first real request, so no line is skipped and `sent` is exact.
local checked = false
local kept = nil

function request()
  if quota >= 0 and sent >= quota then
    wrk.thread:stop()
    return filler
  end
  local line
  if kept ~= nil then
    line, kept = kept, nil
  else
    line = next_line()
  end
  if line == nil then
    exhausted = exhausted + 1
    return filler
  end
  if tid == 0 and not checked then
    checked, kept = true, line
  else
    sent = sent + 1
  end
  return build(line)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    failed = failed + 1
  end
end

-- Main state again: one machine-readable line for the driver ------------------------------------

function done(summary, latency, requests)
  local per_thread = {}
  for _, thread in ipairs(threads) do
    per_thread[#per_thread + 1] = string.format(
      '{"sent":%d,"ok":%d,"failed":%d,"exhausted":%d,"pos":%d}',
      thread:get("sent"), thread:get("ok"), thread:get("failed"), thread:get("exhausted"), thread:get("pos"))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"threads":[%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(per_thread, ",")))
end
