-- wrk script: POST one prebuilt body over and over, count the answers by status, and print
-- one JSON line at the end (counts summed over wrk's threads, errors, latency p99 and max).
-- Usage: wrk -s tests/wrk_status.lua URL -- BODY_FILE CONTENT_TYPE [STOP_AFTER]
-- With STOP_AFTER, a thread stops after that many answers and prints a line "stopped";
-- wrk itself ends at its -d duration or on SIGINT, whichever comes first.
local threads = {}

-- wrk runs this script once per thread, each in its own Lua state: setup() runs in the main
-- state and keeps a handle on every thread, so done() can read their counts back.
function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*all")
  file:close()
  request_bytes = wrk.format("POST", nil, { ["Content-Type"] = args[2] }, body)
  stop_after = tonumber(args[3])
  statuses = {}
  shed_without_retry_after = 0
  answers = 0
end

function request()
  return request_bytes
end

local function has_header(headers, wanted)
  for name, _ in pairs(headers) do
    if string.lower(name) == wanted then
      return true
    end
  end
  return false
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 503 and not has_header(headers, "retry-after") then
    shed_without_retry_after = shed_without_retry_after + 1
  end
  answers = answers + 1
  if stop_after and answers == stop_after then
    io.write("stopped\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local totals, parts = {}, {}
  local unhinted = 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + count
    end
    unhinted = unhinted + thread:get("shed_without_retry_after")
  end
  for status, count in pairs(totals) do
    table.insert(parts, string.format('"%s": %d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    '{"statuses": {%s}, "shed_without_retry_after": %d, "requests": %d, "duration_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    table.concat(parts, ", "), unhinted, summary.requests, summary.duration,
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
