-- wrk script of bench/serve_bench.py: RFC 8058 one-click POSTs, as Gmail and Yahoo send
-- them, each with the next token of the file given after "--" (one token a line).
-- Prints one line "RESULT {json}" at the end for the bench to read.

local tokens = {}
local next_index = 1

function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
  -- Each wrk thread starts at its own place in the list, so threads do not repeat tokens.
  next_index = (id or 0) * 7919 % #tokens + 1
end

local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

local headers = {
  ["Content-Type"] = "application/x-www-form-urlencoded",
  ["User-Agent"] = "serve-bench",
}
local body = "List-Unsubscribe=One-Click"

function request()
  local token = tokens[next_index]
  next_index = next_index % #tokens + 1
  return wrk.format("POST", "/u/" .. token, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d}, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
