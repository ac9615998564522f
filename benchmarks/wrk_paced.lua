-- Paces wrk to a fixed request rate per thread (wrk2 is not in Debian), given as the script's
-- argument: `wrk -t T -c C -s wrk_paced.lua URL -- <requests per second per thread>`.
-- Request k of a thread is due k/rate after its first; delay() holds each send until its due time
-- (wrk's timers have millisecond granularity, so a send may leave up to 1 ms early; a late one
-- leaves at once). Latency counts from the real send; with many connections a slow response
-- holds back only its own connection's next request. Prints the same WRK_JSON line as
-- wrk_report.lua.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval_ms, next_due

init = function(args)
  local rate = tonumber(args[1])
  if rate == nil or rate <= 0 then
    error("wrk_paced.lua needs the rate per thread: wrk ... -- <requests per second>")
  end
  interval_ms = 1000 / rate
end

delay = function()
  local now = now_ms()
  next_due = (next_due or now) + interval_ms
  local wait = next_due - now
  if wait < 0 then
    return 0
  end
  return wait
end

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "wrk_report.lua")
