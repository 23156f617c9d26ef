"""An HTTP server speaking TensorFlow Serving's REST API for an exported run.

  tt-mimic serve --model_dir=<run> [--host=127.0.0.1] [--port=8501] \
      [--index=scann|brute_force]

Endpoints (MODEL is --model_name, default tt_mimic; each also answers under
/v1/models/MODEL/versions/1):

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
"""

from __future__ import annotations

import http.server
import json
import threading
import traceback

from absl import logging

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic.config import ServeConfig
from tt_mimic.serving import recommender as recommend

VERSION = "1"
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


def _check_user_id(value, where: str):
  if value is not None and not isinstance(value, str):
    raise RequestError(f"{where}: user_id must be a string or null, got "
                       f"{type(value).__name__}.")
  return value


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
  return value


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
  unknown = sorted(set(body) - set(_TOP_LEVEL_FIELDS))
  if unknown:
    raise RequestError(f"Unknown field(s) {unknown}; expected "
                       f"{list(_TOP_LEVEL_FIELDS)}.")
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
      extra = sorted(set(row) - set(_INSTANCE_FIELDS))
      if extra:
        raise RequestError(f"{where}: unknown field(s) {extra}; expected "
                           f"{list(_INSTANCE_FIELDS)}.")
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
  extra = sorted(set(columns) - set(_INSTANCE_FIELDS))
  if extra:
    raise RequestError(f"inputs: unknown field(s) {extra}; expected "
                       f"{list(_INSTANCE_FIELDS)}.")
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


class Server(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer holding one Recommender and the request limits."""

  daemon_threads = True
  allow_reuse_address = True
  # The listen backlog: the default of 5 reset connections under 50
  # concurrent clients (the kernel dropped the overflow).
  request_queue_size = 1024

  def __init__(self, recommender: recommend.Recommender,
               config: ServeConfig = ServeConfig()):
    super().__init__((config.host, config.port), Handler)
    self.recommender = recommender
    self.model_name = config.model_name
    self.max_body_bytes = config.max_body_bytes
    self.max_batch = config.max_batch
    self.max_history = config.max_history
    self.default_k = min(config.k, recommender.k)
    self.request_timeout = config.request_timeout
    self._lock = threading.Lock()
    self._counts = {"requests": 0, "predictions": 0, "errors": 0}

  def count(self, **increments) -> None:
    with self._lock:
      for name, value in increments.items():
        self._counts[name] += value

  def counts(self) -> dict:
    with self._lock:
      return dict(self._counts)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/v1/models/{self.model_name}"


class Handler(http.server.BaseHTTPRequestHandler):
  """Routes the TF Serving REST paths; every answer is JSON."""

  server: Server
  def setup(self):
    # Seconds a client may take to send its request (socket timeout).
    self.timeout = self.server.request_timeout
    super().setup()
  server_version = "tt_mimic-serve/" + tt_mimic.__version__

  # ---------------------------------------------------------------- routes

  def _route(self) -> str | None:
    """'status', 'metadata', 'predict' or None for the request path."""
    path = self.path.split("?", 1)[0].rstrip("/")
    base = f"/v1/models/{self.server.model_name}"
    for prefix in (base + f"/versions/{VERSION}", base):
      if path == prefix:
        return "status"
      if path == prefix + "/metadata":
        return "metadata"
      if path == prefix + ":predict":
        return "predict"
    return None

  def do_GET(self):  # pylint: disable=invalid-name
    self.server.count(requests=1)
    route = self._route()
    if route == "status":
      self._json(200, {"model_version_status": [{
          "version": VERSION, "state": "AVAILABLE",
          "status": {"error_code": "OK", "error_message": ""}}]})
    elif route == "metadata":
      self._json(200, self._metadata())
    elif route == "predict":
      self._error(405, "Use POST for :predict.")
    else:
      self._error(404, f"Not found: {self.path}. Try GET {self._base()} or "
                  f"POST {self._base()}:predict.")

  def do_POST(self):  # pylint: disable=invalid-name
    self.server.count(requests=1)
    route = self._route()
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
          self.server.default_k)
      recommender = self.server.recommender
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

  def _metadata(self) -> dict:
    r = self.server.recommender
    return {"model_spec": {"name": self.server.model_name,
                           "version": VERSION,
                           "signature_name": "serving_default"},
            "metadata": {
                "inputs": {"user_id": "string", "history":
                           "list of parent_asin strings, oldest first "
                           "(optional)"},
                "outputs": {"parent_asin": "string[k]", "scores": "float[k]",
                            "title": "string[k]", "author": "string[k]",
                            "categories": "list of strings[k]",
                            "source": "string", "note": "string"},
                "k": {"default": self.server.default_k, "max": r.k},
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
    """Reads and drops a body we do not use (so the client sees our answer)."""
    try:
      length = self._content_length()
    except RequestError:
      return
    if length > _DRAIN_LIMIT:
      self.close_connection = True
      return
    while length > 0:
      chunk = self.rfile.read(min(length, 1 << 16))
      if not chunk:
        break
      length -= len(chunk)

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
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True

  def _error(self, status: int, message: str) -> None:
    self.server.count(errors=1)
    self._json(status, {"error": message})

  def send_error(self, code, message=None, explain=None):
    """Protocol-level errors (bad request line, ...) as JSON too."""
    self.close_connection = True
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
