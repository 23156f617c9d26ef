"""Top-k books for a user from an exported run (`tt-mimic recommend` is
its command line).

`Recommender` loads `<model_dir>/export` (the serving SavedModel, the
ScaNN index, the book metadata and the table of books each user has read)
and answers one of three ways, which each answer's `source` names:

  known user                             the user's stored reading history
                                         (or the given one, which replaces it)
  history-based (unknown user)           an unknown user with a given history
                                         of known books
  popularity (unknown user, no history)  the most-read books

History entries that the model does not know are ignored and listed in the
answer's `note`; they never raise. Books added by `tt-mimic catalog` stand in
a history as the trained book nearest to them (their `history_proxy`, chosen
by the catalog from the candidate embeddings), since the query tower has no
id for them. Books the user has read (from the export's `seen.parquet`, plus
the given history) are excluded unless asked otherwise.

Export versions: `<model_dir>/export/` is version 1, as `tt-mimic export`
wrote it, with its serving model in `export/serving/1/`. Each `tt-mimic
catalog` writes version n >= 2 whole (the serving model into
`export/serving/<n>/`, TensorFlow Serving's versioned layout; the ScaNN
index, items.parquet, embeddings.npy and export.json into
`export/versions/<n>/`; candidate/ and seen.parquet stay in `export/`) and
then names it in `export/CURRENT`, replaced atomically. A version made from
another base export (the run was re-exported since) is stale and ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.data import text


KNOWN_USER = "known user"
HISTORY_BASED = "history-based (unknown user)"
POPULARITY = "popularity (unknown user, no history)"
INDEXES = ("scann", "brute_force")
VERSIONS = "versions"  # export/versions/<n>/: versions written by catalog
SERVING = "serving"  # export/serving/<n>/: each version's serving model
CURRENT = "CURRENT"  # export/CURRENT: the version served (absent: 1)

# Cap on batch x exclusions x retrieved books compared in one index call.
_EXCLUSION_BUDGET = 20_000_000


class ExportError(RuntimeError):
  """An export directory that cannot be served, with the reason."""


class Recommendations(list):
  """One user's results: a list of dicts, best first, with how they came.

  Each result has rank (1-based), parent_asin, title, author, categories
  (list of str) and score.

  Attributes:
    source: KNOWN_USER, HISTORY_BASED or POPULARITY.
    note: `source` with details (ignored history entries, short lists).
    ignored_history: history entries the model does not know.
    excluded: how many books were excluded as already read.
  """

  def __init__(self, rows, source: str, note: str,
               ignored_history: list[str], excluded: int):
    super().__init__(rows)
    self.source = source
    self.note = note
    self.ignored_history = ignored_history
    self.excluded = excluded

  def to_json(self) -> dict:
    return {"source": self.source, "note": self.note,
            "ignored_history": list(self.ignored_history),
            "excluded": self.excluded, "results": list(self)}


def export_directory(model_dir: str) -> str:
  """`<model_dir>/export` (or `model_dir` itself if it is an export)."""
  if not model_dir:
    raise ExportError("--model_dir is empty; give a training run directory.")
  for directory in (os.path.join(model_dir, "export"), model_dir):
    if os.path.exists(os.path.join(directory, "export.json")):
      return directory
  if not os.path.isdir(model_dir):
    raise ExportError(f"model_dir {model_dir} does not exist.")
  raise ExportError(f"No export under {model_dir} (expected "
                    f"{os.path.join(model_dir, 'export', 'export.json')}); "
                    "train with export on, or run tt-mimic export "
                    f"--model_dir={model_dir}.")


def base_fingerprint(directory: str) -> str:
  """A digest of `<directory>/export.json`: it changes with every export."""
  with open(os.path.join(directory, "export.json"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def serving_path(directory: str, version: int) -> str:
  """`<export>/serving/<version>`: the version's self-contained serving
  model (TensorFlow Serving's layout: `--model_base_path=<export>/serving`)."""
  return os.path.join(directory, SERVING, str(version))


def version_path(directory: str, version: int) -> str:
  """Where version `version` (>= 2) of the export in `directory` lives."""
  return os.path.join(directory, VERSIONS, str(version))


def current_version(directory: str) -> tuple[int, str, str]:
  """The export version to serve: (version, its directory, a token).

  The token changes whenever another version is named in CURRENT or the
  base export is rewritten; it is cheap to compute (three small reads), so
  a server may poll it.

  Args:
    directory: an export directory (see `export_directory`).
  """
  base = base_fingerprint(directory)
  try:
    with open(os.path.join(directory, CURRENT)) as f:
      version = int(f.read().strip() or 1)
  except FileNotFoundError:
    version = 1
  except ValueError:
    raise ExportError(f"{os.path.join(directory, CURRENT)} does not hold a "
                      "version number; remove it to serve version 1.") from None
  if version <= 1:
    return 1, directory, f"{base}:1"
  path = version_path(directory, version)
  try:
    with open(os.path.join(path, "export.json")) as f:
      made_from = json.load(f).get("base_export")
  except (OSError, ValueError):
    made_from = None
  if made_from != base:  # missing, or made from an earlier export
    return 1, directory, f"{base}:1"
  return version, path, f"{base}:{version}"


def _load(path: str):
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    raise ExportError(f"{path} is missing or incomplete; re-export the run.")
  try:
    return tf.saved_model.load(path)
  except (OSError, ValueError, tf.errors.OpError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ExportError(f"Cannot load {path}: {first}") from e


def load_serving(directory: str, version: int):
  """The version's serving SavedModel (`serving_path`)."""
  return _load(serving_path(directory, version))


def load_scann(version_directory: str):
  """`<version directory>/index_scann`, importing ScaNN's ops first."""
  try:
    import scann  # noqa: F401  pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(
        f"The ScaNN index needs the scann package ({e}); install "
        "scann[tf] or use the brute_force index.") from e
  return _load(os.path.join(version_directory, "index_scann"))


def load_candidate(directory: str):
  """`<export>/candidate`, importing tensorflow-text's ops first (a run
  with --title_standardize=unicode standardizes titles with them)."""
  text.load_ops()
  return _load(os.path.join(directory, "candidate"))


def index_inputs(query_outputs) -> dict:
  """The ScaNN index's inputs from the query signature's outputs: the
  user's embedding, and for a blend the user's books (what EASE scores)."""
  return {name: query_outputs[name] for name in ("embedding", "books")
          if name in query_outputs}


def _pad(rows: list[list[str]]) -> np.ndarray:
  """Lists of strings -> [len(rows), max(1, longest)] array padded with ''."""
  width = max([1] + [len(r) for r in rows])
  out = np.full((len(rows), width), "", dtype=object)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out.astype(str)


class Recommender:
  """Top-k books from an exported run.

  Loading takes a few seconds; answering is thread-safe (the state built at
  load time is never changed and TensorFlow functions may be called
  concurrently).

  Attributes:
    model_dir: as given.
    directory: the export directory (version 1; serving/, seen.parquet).
    version: the export version loaded (1, or one written by catalog).
    version_directory: where that version's indexes and items are.
    token: `current_version`'s token for the loaded version.
    k: the most results per user the export holds.
    info: export.json of the version.
    index_name: "scann" or "brute_force".
    model: the loaded index SavedModel.
    items: items.parquet (parent_asin, title, author, categories, ...).
  """

  def __init__(self, model_dir: str, index: str = "scann"):
    """Loads `<model_dir>/export`.

    Args:
      model_dir: a training run directory (or its export directory).
      index: "scann" or "brute_force".

    Raises:
      ExportError: the directory is not a usable export.
      ValueError: unknown index.
    """
    self.model_dir = model_dir
    self.directory = export_directory(model_dir)
    self.version, self.version_directory, self.token = current_version(
        self.directory)
    here = self.version_directory
    for path in (os.path.join(here, "export.json"),
                 os.path.join(here, "items.parquet"),
                 os.path.join(self.directory, "seen.parquet")):
      if not os.path.exists(path):
        raise ExportError(f"{path} is missing; re-export the run.")
    with open(os.path.join(here, "export.json")) as f:
      self.info = json.load(f)
    self.k = int(self.info["k"])
    if index not in INDEXES:
      raise ValueError(f"Unknown index {index!r}; expected one of {INDEXES}.")
    self.index_name = index
    self.serving = load_serving(self.directory, self.version)
    try:
      with_history = self.serving.signatures["with_history"]
      query = self.serving.signatures["query"]
    except KeyError:
      raise ExportError("The serving model has no with_history or query "
                        "signature; re-export the run.") from None
    if index == "brute_force":
      self.model = self.serving
      self._predict = with_history
    else:
      self.model = load_scann(here)
      search = self.model.signatures["serving_default"]

      def predict(user_id, history, exclude):
        q = query(user_id=user_id, history=history)
        return search(known=q["known"], exclude=exclude, **index_inputs(q))

      self._predict = predict
    items = pd.read_parquet(os.path.join(here, "items.parquet"))
    items["categories"] = items["categories"].map(
        lambda c: [] if c is None else [str(x) for x in c])
    self.items = items
    self._row = {a: i for i, a in enumerate(items["parent_asin"])}
    self._titles = items["title"].fillna("").astype(str).tolist()
    self._authors = items["author"].fillna("").astype(str).tolist()
    self._categories = items["categories"].tolist()
    # The query model knows the books of training; books added later by
    # tt_mimic.catalog stand in a history as their nearest trained book.
    self._base_items = int(self.info.get("base_items", len(items)))
    proxies = (items["history_proxy"].fillna("").astype(str).tolist()
               if "history_proxy" in items else [""] * len(items))
    self._proxy = {a: p for a, p in zip(items["parent_asin"][
        self._base_items:], proxies[self._base_items:]) if p}
    # A model trained with --history_length=0 ignores histories.
    self.uses_history = int(self.info.get("history_length", 1)) > 0
    seen = pd.read_parquet(os.path.join(self.directory, "seen.parquet"))
    self._seen_asins = seen["parent_asin"].to_numpy(dtype=object)
    self._seen_rows = seen.groupby("userId", sort=False).indices

  # ------------------------------------------------------------- queries

  def known_users(self) -> list[str]:
    """Every user the export knows, in order of first appearance."""
    return list(self._seen_rows)

  def is_known_user(self, user_id: str | None) -> bool:
    return bool(user_id) and user_id in self._seen_rows

  def seen(self, user_id: str | None) -> list[str]:
    """The books the export records for the user, oldest first."""
    rows = self._seen_rows.get(user_id) if user_id else None
    return [] if rows is None else list(self._seen_asins[rows])

  def book(self, parent_asin: str) -> dict | None:
    """Metadata of one corpus book, or None."""
    row = self._row.get(parent_asin)
    if row is None:
      return None
    return {"parent_asin": parent_asin, "title": self._titles[row],
            "author": self._authors[row],
            "categories": list(self._categories[row])}

  def _plan(self, user_id, history, exclude_seen):
    """What to send to the index for one user, and how to describe it."""
    user_id = "" if user_id is None else str(user_id)
    if isinstance(history, (str, bytes)):
      raise ValueError("history must be a list of parent_asins, not a "
                       f"string ({history!r}).")
    history = [str(h) for h in (history or [])]
    usable, ignored, proxied = [], [], []
    for h in history:
      if self._row.get(h, self._base_items) < self._base_items:
        usable.append(h)
      elif h in self._proxy:
        usable.append(self._proxy[h])
        proxied.append(h)
      else:
        ignored.append(h)
    if self.is_known_user(user_id):
      source = KNOWN_USER
    elif usable and self.uses_history:
      source = HISTORY_BASED
    else:
      source = POPULARITY
    exclude = []
    if exclude_seen:
      exclude = list(dict.fromkeys(self.seen(user_id) + history))
    return user_id, usable, ignored, source, exclude, proxied

  def recommend_batch(self, user_ids, histories=None, k: int = 10,
                      exclude_seen: bool = True) -> list[Recommendations]:
    """Recommendations for several users at once.

    Args:
      user_ids: user ids (None or '' for an anonymous user).
      histories: None, or one list of parent_asins (oldest first) or None
        per user.
      k: results per user, 1 <= k <= self.k.
      exclude_seen: leave out the books each user has read.

    Returns:
      One `Recommendations` per user, in order.

    Raises:
      ValueError: bad k, or histories of another length than user_ids.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise ValueError(f"k must be an integer, got {k!r}.")
    if not 1 <= k <= self.k:
      raise ValueError(f"k={k} is out of range: this export returns at most "
                       f"{self.k} results per user (export_k).")
    user_ids = list(user_ids)
    if histories is None:
      histories = [None] * len(user_ids)
    histories = list(histories)
    if len(histories) != len(user_ids):
      raise ValueError(f"{len(user_ids)} user ids but {len(histories)} "
                       "histories.")
    plans = [self._plan(u, h, exclude_seen)
             for u, h in zip(user_ids, histories)]
    answers = []
    for start, stop in self._chunks(plans):
      part = plans[start:stop]
      out = self._predict(
          user_id=tf.constant([p[0] for p in part], tf.string),
          history=tf.constant(_pad([p[1] for p in part])),
          exclude=tf.constant(_pad([p[4] for p in part])))
      ids = out["parent_asin"].numpy()
      scores = out["scores"].numpy()
      for plan, row_ids, row_scores in zip(part, ids, scores):
        answers.append(self._answer(plan, row_ids, row_scores, k))
    return answers

  def recommend(self, user_id: str | None = None,
                history: list[str] | None = None, k: int = 10,
                exclude_seen: bool = True) -> Recommendations:
    """Top-k books for one user; see `recommend_batch`."""
    return self.recommend_batch([user_id], [history], k, exclude_seen)[0]

  def _chunks(self, plans):
    """Row ranges whose exclusion comparison stays within the budget."""
    # Each of a user's query vectors retrieves its own books.
    retrieve = int(self.info.get("retrieve", self.k)) * int(
        self.info.get("interests", 1))
    start = 0
    while start < len(plans):
      stop, widest = start, 1
      while stop < len(plans):
        widest = max(widest, len(plans[stop][4]))
        if stop > start and (stop + 1 - start) * widest * retrieve > (
            _EXCLUSION_BUDGET):
          break
        stop += 1
      yield start, stop
      start = stop

  def _answer(self, plan, ids, scores, k) -> Recommendations:
    _, usable, ignored, source, exclude, proxied = plan
    excluded = set(exclude)
    rows = []
    for asin, score in zip(ids.tolist(), scores.tolist()):
      asin = asin.decode() if isinstance(asin, bytes) else str(asin)
      if not asin or not math.isfinite(score) or asin in excluded:
        continue
      book = self.book(asin) or {"parent_asin": asin, "title": "",
                                 "author": "", "categories": []}
      rows.append({"rank": len(rows) + 1, **book, "score": float(score)})
      if len(rows) == k:
        break
    note = source
    if history_unused := (usable and not self.uses_history):
      note += ("; this model was trained with --history_length=0 and does "
               "not use histories")
    if source == KNOWN_USER and usable and not history_unused:
      note += "; the given history replaces the stored one"
    if proxied and not history_unused:
      note += (f"; {len(proxied)} history "
               f"entr{'y' if len(proxied) == 1 else 'ies'} added by the "
               "catalog stand in as the nearest trained book")
    if ignored:
      shown = ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else "")
      note += (f"; ignored {len(ignored)} history "
               f"entr{'y' if len(ignored) == 1 else 'ies'} the model does not "
               f"know: {shown}")
    if len(rows) < k:
      note += (f"; only {len(rows)} results after excluding "
               f"{len(excluded)} read books")
    return Recommendations(rows, source, note, ignored, len(excluded))


# ----------------------------------------------------------------- output


def _clip(text: str, width: int) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= width else text[:width - 3] + "..."


def format_table(recs: Recommendations, title_width: int = 60,
                 author_width: int = 28) -> str:
  """A plain-text table: rank, title, author, score."""
  lines = [f"{'#':>3}  {'title':<{title_width}}  {'author':<{author_width}}"
           f"  {'score':>8}",
           f"{'-' * 3}  {'-' * title_width}  {'-' * author_width}  "
           f"{'-' * 8}"]
  for r in recs:
    title = _clip(r["title"] or r["parent_asin"], title_width)
    author = _clip(r["author"] or "-", author_width)
    lines.append(f"{r['rank']:>3}  {title:<{title_width}}  "
                 f"{author:<{author_width}}  {r['score']:>8.4f}")
  if not recs:
    lines.append("(no results)")
  return "\n".join(lines)


def print_example(model_dir: str, prep, k: int) -> None:
  """Prints one known test user's top-k from the fresh export of a run.

  Args:
    model_dir: the run directory (its export must exist).
    prep: the run's `runner.Prepared`.
    k: results to show (capped at the export's k).
  """
  users = prep.test.users if len(prep.test.users) else prep.val.users
  if not len(users):
    print("No evaluated user to show recommendations for.")
    return
  user_id = str(prep.data.users[int(users[0]) - 1])
  try:
    recommender = Recommender(model_dir, index="scann")
  except ExportError:
    recommender = Recommender(model_dir, index="brute_force")
  recs = recommender.recommend(user_id, k=min(k, recommender.k))
  read = recommender.seen(user_id)
  print(f"\nTop {len(recs)} for user {user_id} ({recs.note}; "
        f"{recommender.index_name} index, {len(read)} books read, "
        "read books excluded)")
  if read:
    print("Recently read:")
    for asin in read[-3:][::-1]:
      book = recommender.book(asin) or {"title": asin, "author": ""}
      print(f"  - {_clip(book['title'], 70)}"
            f"{' (' + book['author'] + ')' if book['author'] else ''}")
  print(format_table(recs))
  print(f"More: tt-mimic recommend --model_dir={model_dir} "
        f"--user_id={user_id} --k={len(recs) or k}\n")
