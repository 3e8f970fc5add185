-- wrk script for bench/scrape_bench.py: print every latency of the run as one JSON line.
--
-- wrk keeps latencies as a histogram in microseconds, and latency(i) returns the i-th
-- distinct value with its count, so the samples can be rebuilt exactly at that resolution.

function done(summary, latency, requests)
    local values = {}
    for i = 1, #latency do
        local value, count = latency(i)
        values[#values + 1] = string.format("[%d,%d]", value, count)
    end
    local errors = summary.errors
    io.write(string.format(
        '{"requests":%d,"status_errors":%d,"socket_errors":%d,"latency_us":[%s]}\n',
        summary.requests, errors.status,
        errors.connect + errors.read + errors.write + errors.timeout,
        table.concat(values, ",")))
end
