-- wrk script: POST one prebuilt body over and over; print a JSON summary at the end.
-- Usage: wrk -s bench/post.lua URL -- BODY_FILE CONTENT_TYPE
local request_bytes

function init(args)
  local file = assert(io.open(args[1], "rb"))
  local body = file:read("*all")
  file:close()
  request_bytes = wrk.format("POST", nil, { ["Content-Type"] = args[2] }, body)
end

function request()
  return request_bytes
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
