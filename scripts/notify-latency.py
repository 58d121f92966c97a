#!/usr/bin/env python3
"""Measures notifier latency while `stevedore bench` runs: follows
/v1/events (terminal events) and, with --webhook-port, also runs a webhook
receiver on 127.0.0.1; prints p50/p99 from each event's commit time (`at`)
to its arrival, and deliveries/s. Stops after --count terminal events or
--seconds. Usage: notify-latency.py URL COUNT [--webhook-port P]"""
import json, sys, threading, time, urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

url, count = sys.argv[1], int(sys.argv[2])
port = int(sys.argv[sys.argv.index("--webhook-port") + 1]) if "--webhook-port" in sys.argv else None
sse_lat, hook_lat, hook_times = [], [], []

def at(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        now = time.time()
        hook_lat.append(now - at(json.loads(body)["data"]["at"]))
        hook_times.append(now)
        self.send_response(204); self.end_headers()
    def log_message(self, *a): pass

if port:
    srv = ThreadingHTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, round((len(xs) - 1) * p))] * 1000 if xs else float("nan")

resp = urllib.request.urlopen(url + "/v1/events?types=job.succeeded,job.dead,job.cancelled", timeout=120)
data = None
for raw in resp:
    line = raw.decode().rstrip("\n")
    if line.startswith("data:"):
        data = line[5:].strip()
    elif line == "" and data:
        sse_lat.append(time.time() - at(json.loads(data)["at"]))
        data = None
        if len(sse_lat) >= count:
            break
print(f"SSE: {len(sse_lat)} terminal events, commit->client ms p50 {pct(sse_lat, .5):.1f} p99 {pct(sse_lat, .99):.1f}")
if port:
    deadline = time.time() + 120
    while len(hook_lat) < count and time.time() < deadline:
        time.sleep(0.2)
    span = (max(hook_times) - min(hook_times)) if len(hook_times) > 1 else float("nan")
    print(f"webhooks: {len(hook_lat)} delivered, commit->receiver ms p50 {pct(hook_lat, .5):.1f} p99 {pct(hook_lat, .99):.1f}, {len(hook_lat) / span:.0f} deliveries/s")
