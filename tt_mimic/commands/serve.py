"""`tt-mimic serve`: TF Serving's REST API for an exported run.

  tt-mimic serve --model_dir=<run> [--host=127.0.0.1] [--port=8501] \
      [--index=scann|brute_force]
"""

from __future__ import annotations

import signal
import sys
import threading

from absl import app

from tt_mimic.commands import common
from tt_mimic.serving import recommender
from tt_mimic.serving import server as server_lib


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.note_ignored(decides="The run's export")
  try:
    server = server_lib.make_server(common.MODEL_DIR.value,
                                    common.serve_config())
  except (recommender.ExportError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  r = server.recommender
  print(f"Serving {r.directory} (version {r.version}, {len(r.items)} books, "
        f"{r.index_name} index, k<={r.k}) at {server.url}\n  curl -s -d "
        f"'{{\"instances\": "
        f"[\"<user_id>\"]}}' {server.url}:predict", flush=True)

  def stop(signum, frame):  # SIGINT/SIGTERM: finish in-flight requests, exit.
    del signum, frame
    threading.Thread(target=server.shutdown, daemon=True).start()

  signal.signal(signal.SIGINT, stop)
  signal.signal(signal.SIGTERM, stop)
  try:
    server.serve_forever()
  finally:
    server.server_close()
  return 0


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
