-- wrk script for bench/http_bench.py: one fixed EMQX 5 HTTP-authorizer request, results as one JSON line.
--
--   wrk -t 1 -c 32 -d 10s --latency -s bench/emqx_authz.lua http://127.0.0.1:PORT/emqx/authz -- TOKEN BODY
--
-- The request is built once (wrk formats it after init() returns); no response() hook, so wrk does not
-- parse bodies and stays cheap. done() prints a line starting with BENCH_JSON that the Python side reads.

function init(args)
   wrk.method = "POST"
   wrk.headers["content-type"] = "application/json"
   if args[1] ~= nil and args[1] ~= "" then
      wrk.headers["x-authhook-token"] = args[1]
   end
   wrk.body = args[2]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0), latency:percentile(99.9)))
end
