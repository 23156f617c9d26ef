"""Load on `tt-mimic serve`: N clients x M predict requests, two ways.

  .venv/bin/python benchmarks/serve_load.py --model_dir=saved_models/sample \
      [--clients=50] [--requests=20] [--modes=new,keepalive] \
      [--index=scann] [--out=/tmp/serve_load.json] [--server_args="..."]

Starts `tt-mimic serve --port=0` on the run's export in a subprocess (or
uses a running server with --url), then for each connection style runs
`--clients` threads that each send `--requests` POST :predict requests
(one known user each, cycling through the export's users, k=10):

  new        a new TCP connection per request (no keep-alive)
  keepalive  one persistent HTTP/1.1 connection per client

and prints, per style, requests/s over the wall time, p50 and p99 latency
(connect included for `new`), connection errors by type and responses by
status, 5xx among them. --out writes the same as JSON. The clients run in
this process, so on a small machine they compete with the server for the
cores: the figures are the pair's, an upper bound on the server's latency.

argparse, not absl flags, so that tests import this module without
defining flags.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.parse

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("new", "keepalive")


def _users(model_dir: str | None, limit: int = 1000) -> list[str]:
  """Known users of the run's export (anonymous ones without a run)."""
  path = model_dir and os.path.join(model_dir, "export", "seen.parquet")
  if not path or not os.path.exists(path):
    return ["load-test-user"]
  import pandas as pd  # pylint: disable=g-import-not-at-top
  users = pd.read_parquet(path, columns=["userId"])["userId"]
  return [str(u) for u in users.drop_duplicates().iloc[:limit]]


def _client(url: str, path: str, bodies: list[bytes], keepalive: bool,
            timeout: float) -> tuple[list[float], collections.Counter,
                                     collections.Counter]:
  """Sends `bodies` one after another; returns latencies, statuses, errors."""
  parts = urllib.parse.urlsplit(url)
  latencies, statuses, errors = [], collections.Counter(), collections.Counter()
  conn = None
  headers = {"Content-Type": "application/json"}
  for body in bodies:
    start = time.perf_counter()
    try:
      if conn is None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                          timeout=timeout)
      conn.request("POST", path, body=body, headers=headers)
      response = conn.getresponse()
      response.read()
      statuses[response.status] += 1
      latencies.append(time.perf_counter() - start)
      if not keepalive or response.will_close:
        conn.close()
        conn = None
    except (OSError, http.client.HTTPException) as e:
      errors[type(e).__name__] += 1
      if conn is not None:
        conn.close()
      conn = None
  if conn is not None:
    conn.close()
  return latencies, statuses, errors


def run_load(url: str, users: list[str], clients: int, requests: int,
             keepalive: bool, timeout: float = 60.0, k: int = 10) -> dict:
  """`clients` threads x `requests` predict requests against `url`.

  Args:
    url: the model's base URL, http://host:port/v1/models/NAME.
    users: user ids to ask for, in turn.
    clients: concurrent client threads.
    requests: requests per client.
    keepalive: one persistent connection per client (else one per request).
    timeout: socket timeout of each client.
    k: results per request.

  Returns:
    requests, seconds, requests_per_second, p50_ms, p99_ms, max_ms,
    errors (by exception type), statuses (by code) and the totals
    error_count and status_5xx.
  """
  path = urllib.parse.urlsplit(url).path + ":predict"
  plans = [[json.dumps({"instances": [users[(c * requests + i) % len(users)]],
                        "k": k}).encode() for i in range(requests)]
           for c in range(clients)]
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    results = list(pool.map(
        lambda bodies: _client(url, path, bodies, keepalive, timeout), plans))
  seconds = time.perf_counter() - start
  latencies = np.array([x for r in results for x in r[0]]) * 1000.0
  statuses, errors = collections.Counter(), collections.Counter()
  for _, s, e in results:
    statuses.update(s)
    errors.update(e)
  done = int(sum(statuses.values()))
  quantile = (lambda q: round(float(np.quantile(latencies, q)), 2)
              if len(latencies) else None)
  return {"mode": "keepalive" if keepalive else "new", "clients": clients,
          "requests": clients * requests, "answered": done,
          "seconds": round(seconds, 3),
          "requests_per_second": round(done / seconds, 1) if seconds else None,
          "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
          "max_ms": round(float(latencies.max()), 2) if len(latencies)
          else None,
          "statuses": {str(code): n for code, n in sorted(statuses.items())},
          "status_5xx": int(sum(n for code, n in statuses.items()
                                if code >= 500)),
          "errors": dict(errors), "error_count": int(sum(errors.values()))}


def start_server(model_dir: str, index: str, extra: list[str]):
  """`tt-mimic serve` on a free port; returns (process, model URL)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  process = subprocess.Popen(
      [sys.executable, "-m", "tt_mimic", "serve", f"--model_dir={model_dir}",
       "--port=0", f"--index={index}", *extra], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = process.stdout.readline()
  if not line.startswith("Serving "):
    process.kill()
    raise RuntimeError(f"tt-mimic serve did not start: {line!r}")
  return process, line.split(" at ")[1].strip()


def _print(result: dict) -> None:
  print(f"{result['mode']:>9}: {result['clients']} clients x "
        f"{result['requests'] // max(result['clients'], 1)} requests: "
        f"{result['requests_per_second']} req/s, p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms, "
        f"errors {result['error_count']} {result['errors'] or ''}, "
        f"5xx {result['status_5xx']}, statuses {result['statuses']}",
        flush=True)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_dir", help="An exported run (for the server "
                      "and its users).")
  parser.add_argument("--url", help="A running server's model URL instead, "
                      "http://host:port/v1/models/NAME.")
  parser.add_argument("--clients", type=int, default=50)
  parser.add_argument("--requests", type=int, default=20,
                      help="Requests per client.")
  parser.add_argument("--modes", default="new,keepalive",
                      help=f"Comma-separated, of {MODES}.")
  parser.add_argument("--index", default="scann",
                      choices=("scann", "brute_force"))
  parser.add_argument("--server_args", default="",
                      help="More flags for tt-mimic serve, e.g. "
                      "'--workers=16'.")
  parser.add_argument("--warmup", type=int, default=20,
                      help="Untimed requests first.")
  parser.add_argument("--out", help="Write the figures here as JSON.")
  args = parser.parse_args(argv)
  modes = [m for m in args.modes.split(",") if m]
  if not args.model_dir and not args.url:
    parser.error("give --model_dir (or --url of a running server)")
  if set(modes) - set(MODES):
    parser.error(f"--modes: choose from {MODES}")
  users = _users(args.model_dir)
  process = None
  url = args.url
  if url is None:
    process, url = start_server(args.model_dir, args.index,
                                shlex.split(args.server_args))
  try:
    if args.warmup:
      run_load(url, users, 1, args.warmup, keepalive=True)
    results = {"url": url, "cpus": os.cpu_count(),
               "server_args": args.server_args, "index": args.index,
               "results": []}
    for mode in modes:
      result = run_load(url, users, args.clients, args.requests,
                        keepalive=mode == "keepalive")
      _print(result)
      results["results"].append(result)
  finally:
    if process is not None:
      process.terminate()
      process.wait(timeout=60)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
