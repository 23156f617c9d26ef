"""An HTTP server speaking TensorFlow Serving's REST API for an exported run.

  tt-mimic serve --model_dir=<run> [--host=127.0.0.1] [--port=8501] \
      [--index=scann|brute_force]

Endpoints (MODEL is --model_name, default tt_mimic; each also answers under
/v1/models/MODEL/versions/N, N the export version served):

  GET  /v1/models/MODEL            model status
  GET  /v1/models/MODEL/metadata   inputs, outputs, k and request counters
  POST /v1/models/MODEL:predict    recommendations

A predict request is TF Serving's row format
  {"instances": ["A1", {"user_id": "B2", "history": ["asin1", "asin2"]}]}
answered with {"predictions": [{"parent_asin": [...], "scores": [...],
"title": [...], "author": [...], "categories": [[...]], "source": "...",
"note": "..."}, ...]}, or its columnar format
  {"inputs": {"user_id": ["A1", "B2"], "history": [[], ["asin1"]]}}
answered with {"outputs": {"parent_asin": [[...], [...]], "scores": ...}}.
Optional top-level fields: "k" (default --k, at most the export's k) and
"exclude_seen" (default true). A user_id may be null or "" for an anonymous
user; histories list parent_asins oldest first. Lists hold fewer than k
entries when exclusions leave fewer books. Bad requests get a 4xx status and
{"error": "..."}; the server keeps serving.

The server speaks HTTP/1.1 with persistent connections. A fixed pool of
--workers threads answers them; when all are busy, accepted connections
wait in a queue of --pending_connections and then in the listen backlog
(1024): a loaded server answers later, it does not refuse. A request must
arrive whole within --request_timeout seconds of its first byte (408
otherwise; a body that ends early gets 400); an idle kept-alive connection
is closed after --keepalive_timeout seconds. Every --reload_interval
seconds the server checks the export's version (tt-mimic catalog writes
new ones) and, if it changed, loads the new version completely and then
swaps it in; requests under way finish on the version they started with.
"""

from __future__ import annotations

import http.server
import io
import json
import queue
import sys
import threading
import time
import traceback

from absl import logging

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic.config import ServeConfig
from tt_mimic.serving import recommender as recommend

_INSTANCE_FIELDS = ("user_id", "history")
_TOP_LEVEL_FIELDS = ("instances", "inputs", "k", "exclude_seen",
                     "signature_name")
_SIGNATURES = ("serving_default", "with_history")
_DRAIN_LIMIT = 16 << 20  # unread bodies up to this size are read and dropped
_OUTPUTS = ("parent_asin", "scores", "title", "author", "categories")


class RequestError(ValueError):
  """A request that cannot be answered; `status` is the HTTP status."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _check_text(value: str, where: str) -> str:
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:  # JSON may escape lone surrogates
    raise RequestError(f"{where}: {value!r} is not valid Unicode text "
                       "(a lone surrogate).") from None
  return value


def _check_user_id(value, where: str):
  if value is not None and not isinstance(value, str):
    raise RequestError(f"{where}: user_id must be a string or null, got "
                       f"{type(value).__name__}.")
  return value if value is None else _check_text(value, where)


def _check_history(value, where: str, max_history: int):
  if value is None:
    return []
  if not isinstance(value, list) or not all(isinstance(h, str)
                                            for h in value):
    raise RequestError(f"{where}: history must be a list of parent_asin "
                       "strings.")
  if len(value) > max_history:
    raise RequestError(f"{where}: history has {len(value)} entries; at most "
                       f"{max_history} are accepted.")
  return [_check_text(h, where) for h in value]


def _reject_unknown(given, allowed, where: str = "") -> None:
  """RequestError naming the fields of `given` not in `allowed`."""
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    text = f"unknown field(s) {unknown}; expected {list(allowed)}."
    raise RequestError(f"{where}: {text}" if where else "U" + text[1:])


def parse_predict(body, max_batch: int, max_history: int, default_k: int):
  """Validates a predict request.

  Args:
    body: the decoded JSON.
    max_batch: most users per request.
    max_history: most history entries per user.
    default_k: k when the request gives none.

  Returns:
    (form, user_ids, histories, k, exclude_seen) where form is "instances"
    or "inputs".

  Raises:
    RequestError: what is wrong with the request.
  """
  if not isinstance(body, dict):
    raise RequestError("The request body must be a JSON object with "
                       "\"instances\" or \"inputs\".")
  _reject_unknown(body, _TOP_LEVEL_FIELDS)
  forms = [f for f in ("instances", "inputs") if f in body]
  if len(forms) != 1:
    raise RequestError("Give exactly one of \"instances\" (row format) or "
                       "\"inputs\" (columnar format).")
  form = forms[0]
  k = body.get("k", default_k)
  if isinstance(k, bool) or not isinstance(k, int):
    raise RequestError(f"k must be an integer, got {json.dumps(k)}.")
  exclude_seen = body.get("exclude_seen", True)
  if not isinstance(exclude_seen, bool):
    raise RequestError("exclude_seen must be true or false, got "
                       f"{json.dumps(exclude_seen)}.")
  signature = body.get("signature_name", "serving_default")
  if signature not in _SIGNATURES:
    raise RequestError(f"signature_name must be one of {list(_SIGNATURES)}.")
  if form == "instances":
    rows = body["instances"]
    if not isinstance(rows, list) or not rows:
      raise RequestError("instances must be a non-empty list.")
    if len(rows) > max_batch:
      raise RequestError(f"{len(rows)} instances in one request; at most "
                         f"{max_batch} are accepted.")
    user_ids, histories = [], []
    for i, row in enumerate(rows):
      where = f"instances[{i}]"
      if isinstance(row, str):
        user_ids.append(row)
        histories.append([])
        continue
      if not isinstance(row, dict):
        raise RequestError(f"{where} must be a user_id string or an object "
                           "with user_id (and history).")
      _reject_unknown(row, _INSTANCE_FIELDS, where)
      if "user_id" not in row:
        raise RequestError(f"{where}: missing field user_id (null for an "
                           "anonymous user).")
      user_ids.append(_check_user_id(row["user_id"], where))
      histories.append(_check_history(row.get("history"), where,
                                      max_history))
    return form, user_ids, histories, k, exclude_seen
  columns = body["inputs"]
  if not isinstance(columns, dict):
    raise RequestError("inputs must be an object: {\"user_id\": [...], "
                       "\"history\": [[...], ...]}.")
  _reject_unknown(columns, _INSTANCE_FIELDS, "inputs")
  if "user_id" not in columns:
    raise RequestError("inputs: missing field user_id.")
  user_ids = columns["user_id"]
  if not isinstance(user_ids, list) or not user_ids:
    raise RequestError("inputs.user_id must be a non-empty list.")
  if len(user_ids) > max_batch:
    raise RequestError(f"{len(user_ids)} user ids in one request; at most "
                       f"{max_batch} are accepted.")
  for i, u in enumerate(user_ids):
    _check_user_id(u, f"inputs.user_id[{i}]")
  histories = columns.get("history")
  if histories is None:
    histories = [[] for _ in user_ids]
  if not isinstance(histories, list) or len(histories) != len(user_ids):
    raise RequestError("inputs.history must be a list with one list of "
                       "parent_asins per user_id.")
  histories = [_check_history(h, f"inputs.history[{i}]", max_history)
               for i, h in enumerate(histories)]
  return form, user_ids, histories, k, exclude_seen


def predict_response(form: str, answers) -> dict:
  """TF Serving's response for `form` from Recommendations."""
  rows = [{"parent_asin": [r["parent_asin"] for r in recs],
           "scores": [r["score"] for r in recs],
           "title": [r["title"] for r in recs],
           "author": [r["author"] for r in recs],
           "categories": [r["categories"] for r in recs],
           "source": recs.source, "note": recs.note} for recs in answers]
  if form == "instances":
    return {"predictions": rows}
  return {"outputs": {name: [row[name] for row in rows]
                      for name in _OUTPUTS + ("source", "note")}}


class _DeadlineReader(io.RawIOBase):
  """A connection's reads with one deadline per request.

  Before a request's first byte the socket waits `idle` seconds (then the
  connection closes quietly); from that byte on, the whole request (line,
  headers and body) must arrive within `limit` seconds, however slowly it
  trickles in: each read waits only for the time left.
  """

  def __init__(self, sock):
    super().__init__()
    self._sock = sock
    self._idle = self._limit = None
    self.deadline = None
    self.expired = False

  def readable(self) -> bool:
    return True

  def begin(self, idle: float, limit: float) -> None:
    """Starts waiting for the next request."""
    self._idle, self._limit = idle, limit
    self.deadline, self.expired = None, False

  def started(self) -> None:
    """The request has begun (its bytes may already be buffered)."""
    if self.deadline is None:
      self.deadline = time.monotonic() + self._limit

  def readinto(self, buffer) -> int:
    if self.deadline is None:
      self._sock.settimeout(self._idle)
    else:
      left = self.deadline - time.monotonic()
      if left <= 0:
        self.expired = True
        raise TimeoutError("the request deadline passed")
      self._sock.settimeout(left)
    try:
      n = self._sock.recv_into(buffer)
    except TimeoutError:
      self.expired = self.deadline is not None
      raise
    if n:
      self.started()
    return n


class PoolMixIn:
  """socketserver mix-in: a fixed pool of worker threads.

  The accepting thread puts connections on a queue of `pending` places and
  `workers` threads take them. When the queue is full, accepting waits for a
  free place, so further connections wait in the kernel's listen backlog
  (`request_queue_size`) instead of being refused: a full server answers
  later, not with errors. Unlike ThreadingMixIn, the thread count stays
  bounded however many clients connect.
  """

  workers = 64
  pending = 256

  def start_workers(self) -> None:
    self._stopping = threading.Event()
    self._queue = queue.Queue(self.pending)
    self._workers = [threading.Thread(target=self._work, daemon=True,
                                      name=f"serve-worker-{i}")
                     for i in range(self.workers)]
    for thread in self._workers:
      thread.start()

  def process_request(self, request, client_address):
    # Waits for a free place, but not past a shutdown (serve_forever must
    # get back to its loop to see it).
    while True:
      try:
        self._queue.put((request, client_address), timeout=0.5)
        return
      except queue.Full:
        if self._stopping.is_set():
          self.shutdown_request(request)
          return

  def shutdown(self):
    self._stopping.set()
    super().shutdown()

  def _work(self) -> None:
    while (item := self._queue.get()) is not None:
      request, client_address = item
      try:
        self.finish_request(request, client_address)
      except Exception:  # pylint: disable=broad-except
        self.handle_error(request, client_address)
      finally:
        self.shutdown_request(request)

  def server_close(self):
    """Stops accepting, drops waiting connections, lets workers finish."""
    super().server_close()
    while True:
      try:
        item = self._queue.get_nowait()
      except queue.Empty:
        break
      if item is not None:
        self.shutdown_request(item[0])
    self._stopping.set()
    for _ in self._workers:
      try:  # the workers are daemon threads: those not told exit with us
        self._queue.put_nowait(None)
      except queue.Full:
        break
    deadline = time.monotonic() + 2.0
    for thread in self._workers:
      thread.join(max(0.0, deadline - time.monotonic()))


class Server(PoolMixIn, http.server.HTTPServer):
  """An HTTP/1.1 server with a bounded worker pool around one Recommender.

  The Recommender is replaced, without a restart, when the export gets a
  new version (`reload_if_changed`, polled every `reload_interval` s).
  """

  allow_reuse_address = True
  # The listen backlog: the default of 5 reset connections under 50
  # concurrent clients (the kernel dropped the overflow).
  request_queue_size = 1024

  def __init__(self, recommender: recommend.Recommender,
               config: ServeConfig = ServeConfig()):
    self.workers = config.workers
    self.pending = config.pending_connections
    super().__init__((config.host, config.port), Handler)
    self._recommender = recommender
    self.config = config
    self.model_name = config.model_name
    self.max_body_bytes = config.max_body_bytes
    self.max_batch = config.max_batch
    self.max_history = config.max_history
    self.request_timeout = config.request_timeout
    self.keepalive_timeout = config.keepalive_timeout
    self._lock = threading.Lock()
    self._counts = {"requests": 0, "predictions": 0, "errors": 0,
                    "reloads": 0}
    self._failed_token = None
    self._stop = threading.Event()
    self.start_workers()
    self._watcher = None
    if config.reload_interval > 0:
      self._watcher = threading.Thread(target=self._watch, daemon=True,
                                       name="serve-reload")
      self._watcher.start()

  @property
  def recommender(self) -> recommend.Recommender:
    """The Recommender answering now (a request keeps the one it took)."""
    with self._lock:
      return self._recommender

  @property
  def default_k(self) -> int:
    return min(self.config.k, self.recommender.k)

  def count(self, **increments) -> None:
    with self._lock:
      for name, value in increments.items():
        self._counts[name] += value

  def counts(self) -> dict:
    with self._lock:
      return dict(self._counts)

  def reload_if_changed(self) -> bool:
    """Loads and swaps in the export's current version if it is new.

    The new version is loaded completely before the swap; until then, and
    if it fails to load, the previous one keeps answering.

    Returns:
      Whether another version now answers.
    """
    current = self.recommender
    try:
      _, _, token = recommend.current_version(current.directory)
    except (OSError, recommend.ExportError) as e:
      logging.warning("Cannot read the export version: %s", e)
      return False
    if token in (current.token, self._failed_token):
      return False
    try:
      fresh = recommend.Recommender(current.model_dir, current.index_name)
    except (OSError, ValueError, recommend.ExportError) as e:
      logging.warning("Export version %s failed to load; still serving "
                      "version %d: %s", token, current.version, e)
      self._failed_token = token
      return False
    with self._lock:
      self._recommender = fresh
      self._counts["reloads"] += 1
    logging.info("Now serving export version %d of %s (%d books).",
                 fresh.version, fresh.directory, len(fresh.items))
    return True

  def _watch(self) -> None:
    while not self._stop.wait(self.config.reload_interval):
      self.reload_if_changed()

  def server_close(self):
    self._stop.set()
    super().server_close()

  def handle_error(self, request, client_address):
    """A client that vanished is logged in one line; anything else in full."""
    if isinstance(sys.exc_info()[1], ConnectionError):
      logging.info("%s went away: %s", client_address[0], sys.exc_info()[1])
    else:
      logging.error("Error handling a request from %s: %s", client_address[0],
                    traceback.format_exc())

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/v1/models/{self.model_name}"


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes the TF Serving REST paths; every answer is JSON.

  Speaks HTTP/1.1: connections persist unless the client (or an error that
  leaves the request stream unreadable) closes them, and every response
  carries Content-Length.
  """

  server: Server
  protocol_version = "HTTP/1.1"
  server_version = "tt_mimic-serve/" + tt_mimic.__version__
  # Headers and body go out in two writes: without TCP_NODELAY, Nagle's
  # algorithm holds the body for the client's delayed ACK (~40 ms per
  # request on a kept-alive connection).
  disable_nagle_algorithm = True

  def setup(self):
    super().setup()
    self.rfile.close()  # reads go through the deadline reader instead
    self._reader = _DeadlineReader(self.connection)
    self.rfile = io.BufferedReader(self._reader, 1 << 16)
    self._requests = 0

  def handle_one_request(self):
    first = self._requests == 0
    self._reader.begin(self.server.request_timeout if first
                       else self.server.keepalive_timeout,
                       self.server.request_timeout)
    self._responded = False
    # What an answer needs before parse_request has set it.
    self.requestline, self.request_version, self.command = "", "HTTP/1.0", ""
    super().handle_one_request()
    self._requests += 1
    if self._reader.expired and not self._responded:
      # The request line or headers did not arrive in time.
      self.close_connection = True
      self.server.count(requests=1, errors=1)
      self._json(408, {"error": "The request did not arrive within "
                                f"{self.server.request_timeout:g} s."})

  def parse_request(self):
    self._reader.started()
    return super().parse_request()

  # ---------------------------------------------------------------- routes

  def _route(self, version: int) -> str | None:
    """'status', 'metadata', 'predict' or None for the request path."""
    path = self.path.split("?", 1)[0].rstrip("/")
    base = f"/v1/models/{self.server.model_name}"
    for prefix in (base + f"/versions/{version}", base):
      if path == prefix:
        return "status"
      if path == prefix + "/metadata":
        return "metadata"
      if path == prefix + ":predict":
        return "predict"
    return None

  def do_GET(self):  # pylint: disable=invalid-name
    self.server.count(requests=1)
    self._discard_body()
    recommender = self.server.recommender
    route = self._route(recommender.version)
    if route == "status":
      self._json(200, {"model_version_status": [{
          "version": str(recommender.version), "state": "AVAILABLE",
          "status": {"error_code": "OK", "error_message": ""}}]})
    elif route == "metadata":
      self._json(200, self._metadata(recommender))
    elif route == "predict":
      self._error(405, "Use POST for :predict.")
    else:
      self._error(404, f"Not found: {self.path}. Try GET {self._base()} or "
                  f"POST {self._base()}:predict.")

  def do_POST(self):  # pylint: disable=invalid-name
    self.server.count(requests=1)
    recommender = self.server.recommender  # this request's, even if swapped
    route = self._route(recommender.version)
    if route is None:
      self._discard_body()
      self._error(404, f"Not found: {self.path}. Predict with POST "
                  f"{self._base()}:predict.")
      return
    if route != "predict":
      self._discard_body()
      self._error(405, f"Use GET for {self.path}.")
      return
    try:
      body = self._read_json()
      form, user_ids, histories, k, exclude_seen = parse_predict(
          body, self.server.max_batch, self.server.max_history,
          min(self.server.config.k, recommender.k))
      if not 1 <= k <= recommender.k:
        raise RequestError(f"k={k} is out of range: this model returns 1 to "
                           f"{recommender.k} results per user.")
      answers = recommender.recommend_batch(user_ids, histories, k,
                                            exclude_seen)
    except RequestError as e:
      self._error(e.status, str(e))
      return
    except Exception as e:  # pylint: disable=broad-except
      logging.error("predict failed: %s", traceback.format_exc())
      self._error(500, f"Internal error: {type(e).__name__}: {e}")
      return
    self.server.count(predictions=len(answers))
    self._json(200, predict_response(form, answers))

  def _method_not_allowed(self):
    self.server.count(requests=1)
    self._discard_body()
    self._error(405, f"Method {self.command} is not allowed; use GET or "
                "POST.")

  do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

  # ---------------------------------------------------------------- helpers

  def _base(self) -> str:
    return f"/v1/models/{self.server.model_name}"

  def _metadata(self, r: recommend.Recommender) -> dict:
    return {"model_spec": {"name": self.server.model_name,
                           "version": str(r.version),
                           "signature_name": "serving_default"},
            "metadata": {
                "inputs": {"user_id": "string", "history":
                           "list of parent_asin strings, oldest first "
                           "(optional)"},
                "outputs": {"parent_asin": "string[k]", "scores": "float[k]",
                            "title": "string[k]", "author": "string[k]",
                            "categories": "list of strings[k]",
                            "source": "string", "note": "string"},
                "k": {"default": min(self.server.config.k, r.k), "max": r.k},
                "index": r.index_name, "items": int(len(r.items)),
                "max_batch": self.server.max_batch,
                "max_body_bytes": self.server.max_body_bytes,
                "counts": self.server.counts()}}
  def _content_length(self) -> int:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self.close_connection = True
      raise RequestError("Chunked bodies are not supported; send "
                         "Content-Length.", 411)
    raw = self.headers.get("Content-Length")
    if raw is None:
      raise RequestError("Content-Length is required.", 411)
    try:
      length = int(raw)
    except ValueError:
      length = -1
    if length < 0:
      self.close_connection = True
      raise RequestError(f"Invalid Content-Length {raw!r}.")
    return length

  def _discard_body(self) -> None:
    """Reads and drops a body we do not use (so the client sees our answer).

    A body that is too long, stops short or arrives late closes the
    connection after the answer instead.
    """
    try:
      length = self._content_length()
    except RequestError:
      return
    if length > _DRAIN_LIMIT:
      self.close_connection = True
      return
    try:
      while length > 0:
        chunk = self.rfile.read(min(length, 1 << 16))
        if not chunk:
          break
        length -= len(chunk)
    except OSError:  # TimeoutError, ConnectionResetError
      length = 1
    if length > 0:
      self.close_connection = True

  def _read_json(self):
    length = self._content_length()
    if length > self.server.max_body_bytes:
      self._discard_body()
      self.close_connection = True
      raise RequestError(f"The body has {length} bytes; at most "
                         f"{self.server.max_body_bytes} are accepted.", 413)
    try:
      data = self.rfile.read(length)
    except TimeoutError:
      self.close_connection = True
      raise RequestError(f"The body did not arrive within "
                         f"{self.server.request_timeout:g} s.", 408) from None
    except ConnectionError as e:
      self.close_connection = True
      raise RequestError(f"The connection broke during the body: {e}") from None
    if len(data) != length:
      self.close_connection = True
      raise RequestError(f"The body ended after {len(data)} of {length} "
                         "bytes.")
    try:
      return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
      raise RequestError(f"Malformed JSON: {e}") from None

  def _json(self, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode("utf-8")
    self._responded = True
    # A client that stops reading gets request_timeout to take the answer.
    self.connection.settimeout(self.server.request_timeout)
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      if self.close_connection:
        self.send_header("Connection", "close")
      elif self.request_version == "HTTP/1.0":
        self.send_header("Connection", "keep-alive")  # it asked to keep it
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
      self.close_connection = True

  def _error(self, status: int, message: str) -> None:
    self.server.count(errors=1)
    self._json(status, {"error": message})

  def send_error(self, code, message=None, explain=None):
    """Protocol-level errors (bad request line, ...) as JSON too."""
    self.close_connection = True
    if self.request_version == "HTTP/0.9":  # one that never parsed: answer
      self.request_version = "HTTP/1.0"  # with a status line all the same
    self.server.count(errors=1)
    self._json(code, {"error": message or self.responses.get(
        code, ("error",))[0]})

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info("%s %s", self.address_string(), format % args)


def make_server(model_dir: str, config: ServeConfig = ServeConfig(),
                recommender: recommend.Recommender | None = None) -> Server:
  """A Server for the export of `model_dir`, bound but not yet serving.

  Run it with `server.serve_forever()` (in a thread if need be) and stop it
  with `server.shutdown()` then `server.server_close()`.

  Args:
    model_dir: a training run directory (or its export directory).
    config: address (port 0 picks a free port, `server.server_address[1]`),
      index, the default k and the request limits.
    recommender: an already loaded Recommender to serve instead.

  Raises:
    recommend.ExportError: the export cannot be served.
  """
  recommender = recommender or recommend.Recommender(model_dir, config.index)
  return Server(recommender, config)
