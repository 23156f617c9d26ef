"""The one pipeline from configs to data and models, and the run directory.

Training, export, evaluation and the benchmarks all go through `prepare`:
ingest (cached) -> vocabularies and the item feature table -> training
sequence and evaluation sets. A run directory stands on its own:

  config.json        the resolved `RunConfig`
  run.json           where the run's ingested artifacts are (inside the run)
  ingest/<key>/      the ingested artifacts (copied in from an outside cache)
  preprocessing/     the adapted vocabularies and the item feature table
  variants/<name>/   each variant's best weights (see `trainer`); for
                     `<exported>_ease`, the EASE blend (`training.blend`)

so `open_run` rebuilds a finished run without the source CSVs, and
`load_variant` restores a trained variant's towers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
import time

from absl import logging
import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import FeatureConfig
from tt_mimic.config import LossConfig
from tt_mimic.config import RunConfig
from tt_mimic.config import TowerConfig
from tt_mimic.config import TrainConfig
from tt_mimic.config import same_settings
from tt_mimic.data import features
from tt_mimic.data import ingest
from tt_mimic.data import pipeline as data_lib
from tt_mimic.model import dat as model_lib
from tt_mimic.model import ease as ease_lib
from tt_mimic.model import ensemble as ensemble_lib
from tt_mimic.model import towers
from tt_mimic.progress import Progress
from tt_mimic.training import evaluation

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
PREPROCESSING_DIR = "preprocessing"
TRAINED_VARIANTS = ("id_only", "two_tower", "dat_no_cal", "dat")
REFIT_SUFFIX = "_refit"
ENSEMBLE_SUFFIX = "_ensemble"
BLEND_SUFFIX = "_ease"
BLEND_TABLES = "blend.npz"
BLEND_INFO = "blend.json"


class RunError(FileNotFoundError):
  """A directory that is not a usable (finished) run, with the reason."""


class RunDirBusyError(RunError):
  """Another process holds the run directory (`holder` names it)."""

  def __init__(self, message: str, holder: str):
    super().__init__(message)
    self.holder = holder


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(model_dir: str, create: bool = True, lock_file: str = LOCK_FILE):
  """Holds `model_dir` for this process: creates it (with `create`; else it
  must exist), checks that it is writable and takes an exclusive lock
  (`<model_dir>/<lock_file>`, flock: the kernel releases it when the process
  ends, also on kill -9). The lock file names its holder while held.

  Raises:
    RunError: the directory does not exist (without `create`), or cannot be
      created or written (before any work).
    RunDirBusyError: another process holds it; the message names that
      process (pid, command, start time).
  """
  path = os.path.join(model_dir, lock_file)
  if not create and not os.path.isdir(model_dir):
    raise RunError(f"{model_dir} does not exist: is it a training run "
                   "(tt-mimic train)?")
  try:
    os.makedirs(model_dir, exist_ok=True)
    handle = open(path, "a+")
  except OSError as e:
    raise RunError(f"Cannot write the run directory {model_dir}: "
                   f"{e.strerror or e}. Choose a writable --model_dir.") from None
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise RunDirBusyError(
          f"{model_dir} is in use by {holder}; wait for it to end or use "
          "another --model_dir.", holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} ({' '.join(sys.argv) or 'python'}, "
                 f"started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    try:
      yield
    finally:
      handle.seek(0)
      handle.truncate()
      fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- prepare


@dataclasses.dataclass
class Prepared:
  """Everything derived once from the ingested data, shared by variants."""
  data: ingest.Ingested
  vocab: features.Vocabularies
  feature_config: FeatureConfig
  preprocessor: features.ItemPreprocessor
  item_table: dict
  item_categories: np.ndarray  # [num_items + 1] top-level category, '' = none
  sequence: data_lib.TrainSequence
  user_id_index: np.ndarray
  item_probability: np.ndarray
  item_counts: np.ndarray
  val: data_lib.EvalSet
  test: data_lib.EvalSet
  fit_splits: tuple[int, ...] = (ingest.SPLIT_TRAIN,)
  # (train config, view) of the last `refit_view`, so that training, export
  # and the example printed after them share one.
  refit_cache: tuple | None = dataclasses.field(default=None, repr=False,
                                                compare=False)


def _preprocessing_state(data: ingest.Ingested, feature_config: FeatureConfig,
                         state_dir: str | None):
  """(vocabularies, preprocessor, item table): the state loaded from
  `state_dir` when it holds it for the same data and features, else built
  (and saved there)."""
  stamp = {"ingest": os.path.basename(data.directory or ""),
           "features": dataclasses.asdict(feature_config)}
  paths = {name: os.path.join(state_dir or "", name) for name in
           ("state.json", "vocabularies.json", "item_table.npz")}
  if state_dir and all(os.path.exists(p) for p in paths.values()):
    with open(paths["state.json"]) as f:
      saved = json.load(f)
    if same_settings(saved, stamp):
      vocab = features.load_vocabularies(paths["vocabularies.json"], data)
      with np.load(paths["item_table.npz"]) as arrays:
        table = {name: arrays[name] for name in arrays.files}
      return (vocab, features.make_preprocessor(vocab, feature_config),
              table)
  vocab = features.build_vocabularies(data, feature_config)
  preprocessor = features.make_preprocessor(vocab, feature_config)
  table = features.build_item_table(data.items, preprocessor, feature_config)
  if state_dir:
    os.makedirs(state_dir, exist_ok=True)
    features.save_vocabularies(vocab, paths["vocabularies.json"])
    np.savez(paths["item_table.npz"], **table)
    with open(paths["state.json"], "w") as f:
      json.dump(stamp, f, indent=1)
  return vocab, preprocessor, table


def prepare(data: ingest.Ingested, feature_config: FeatureConfig,
            train_config: TrainConfig,
            state_dir: str | None = None) -> Prepared:
  """Vocabularies, item table, training sequence and evaluation sets.

  Args:
    data: the ingested artifacts.
    feature_config: vocabulary caps and history length.
    train_config: its seed and eval_max_users pick the evaluated users.
    state_dir: where the preprocessing state is kept (a run's
      `preprocessing/`); None builds it and keeps nothing.
  """
  vocab, preprocessor, table = _preprocessing_state(data, feature_config,
                                                    state_dir)
  for name, values in table.items():
    if not np.all(np.isfinite(values)):
      raise ValueError(f"Item feature '{name}' has non-finite values after "
                       "preprocessing; check the numeric columns.")
  categories = np.array([""] + [features.top_category(list(c))
                                 for c in data.items["categories"]],
                         dtype=object)
  return _with_fit(Prepared(
      data=data, vocab=vocab, feature_config=feature_config,
      preprocessor=preprocessor, item_table=table,
      item_categories=categories, sequence=None, user_id_index=None,
      item_probability=None, item_counts=None, val=None, test=None),
      train_config, (ingest.SPLIT_TRAIN,))


def _with_fit(prep: Prepared, train_config: TrainConfig,
              splits: tuple[int, ...]) -> Prepared:
  """`prep` with what depends on the events a model is fitted on: the
  training sequence, the user ids it knows, the books' sampling
  probabilities (log-Q) and the evaluation sets' user ids."""
  events = prep.data.events
  fit = events[events["split"].isin(splits)]
  num_users = len(prep.data.users)
  known_users = np.zeros(num_users + 1, bool)
  known_users[fit["user"].to_numpy()] = True
  user_id_index = np.where(known_users, np.arange(num_users + 1), 0)
  counts = item_counts(events, len(prep.data.items), splits)
  h = prep.feature_config.history_length
  # Validation knows the training events; test also knows validation's, as
  # a deployed model would (DESIGN.md, "Evaluation").
  make = lambda split, known: data_lib.eval_set(  # noqa: E731
      events, split, user_id_index, h, train_config.eval_max_users,
      train_config.seed, known)
  return dataclasses.replace(
      prep, sequence=data_lib.train_sequence(events, splits),
      user_id_index=user_id_index,
      item_probability=(counts / counts.sum()).astype(np.float32),
      item_counts=counts,
      val=make(ingest.SPLIT_VAL, (ingest.SPLIT_TRAIN,)),
      test=make(ingest.SPLIT_TEST, (ingest.SPLIT_TRAIN, ingest.SPLIT_VAL)),
      fit_splits=tuple(splits), refit_cache=None)


def item_counts(events, num_items: int,
                splits: tuple[int, ...]) -> np.ndarray:
  """[num_items + 1] int64: each book's events in `splits` (index 0, the
  padding, 0): the counts a model fitted on those splits saw."""
  fit = events[events["split"].isin(splits)]
  counts = np.bincount(fit["item"].to_numpy(), minlength=num_items + 1)
  counts[0] = 0
  return counts.astype(np.int64)


def refit_view(prep: Prepared, train_config: TrainConfig) -> Prepared:
  """`prep` for a model fitted on training plus validation events (the
  vocabularies and item table stay those of the training split)."""
  if prep.refit_cache is None or prep.refit_cache[0] != train_config:
    prep.refit_cache = (train_config, _with_fit(
        prep, train_config, (ingest.SPLIT_TRAIN, ingest.SPLIT_VAL)))
  return prep.refit_cache[1]


# ------------------------------------------------------------------ runs


def _inside(path: str, directory: str) -> bool:
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return os.path.commonpath([path, directory]) == directory


def _copy_into_run(data: ingest.Ingested, model_dir: str) -> None:
  """Copies artifacts cached outside the run into `<model_dir>/ingest/`."""
  target = os.path.join(model_dir, "ingest", os.path.basename(data.directory))
  if not os.path.exists(os.path.join(target, "ingest_report.json")):
    if os.path.exists(target):
      shutil.rmtree(target)
    shutil.copytree(data.directory, target + ".tmp")
    os.replace(target + ".tmp", target)
  data.directory = target


def start_run(config: RunConfig, model_dir: str,
              cache_dir: str | None = None) -> Prepared:
  """Writes the run's config, ingests (cached) and prepares the data.

  Raises:
    ingest.IngestError: the input cannot be used.
  """
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, CONFIG_FILE), "w") as f:
    f.write(config.to_json() + "\n")
  data = ingest.run_cached(config.ingest, model_dir, cache_dir)
  if not _inside(data.directory, model_dir):
    _copy_into_run(data, model_dir)
  with open(os.path.join(model_dir, RUN_FILE), "w") as f:
    json.dump({"ingest_dir": os.path.relpath(data.directory, model_dir)}, f,
              indent=1)
  return prepare(data, config.features, config.train,
                 os.path.join(model_dir, PREPROCESSING_DIR))


def read_config(model_dir: str) -> RunConfig:
  """The run's resolved config (`<model_dir>/config.json`)."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise RunError(f"{path} not found: is {model_dir} a training run "
                   "(tt-mimic train)?")
  with open(path) as f:
    return RunConfig.from_json(f.read())


def ingest_directory(model_dir: str) -> str:
  """Where a run's ingested data is (`RUN_FILE`'s entry).

  Raises:
    RunError: the run was not ingested, or its data is gone.
  """
  path = os.path.join(model_dir, RUN_FILE)
  if not os.path.exists(path):
    raise RunError(f"{path} not found: {model_dir} was not ingested.")
  with open(path) as f:
    directory = os.path.join(model_dir, json.load(f)["ingest_dir"])
  if not os.path.exists(os.path.join(directory, "ingest_report.json")):
    raise RunError(f"The run's ingested data {directory} is missing.")
  return directory


def open_run(model_dir: str) -> tuple[RunConfig, Prepared]:
  """A run's config and prepared data, from the run directory alone."""
  config = read_config(model_dir)
  data = ingest.load(ingest_directory(model_dir))
  logging.info("Opened run %s (%d books, %d users)", model_dir,
               len(data.items), len(data.users))
  return config, prepare(data, config.features, config.train,
                         os.path.join(model_dir, PREPROCESSING_DIR))


# ---------------------------------------------------------------- models


@dataclasses.dataclass
class Built:
  """A variant's towers (`model` is None for an ensemble, whose towers
  combine its `members`' (model.ensemble)); `blend`, EASE added to their
  scores (model.ease)."""
  model: model_lib.DATModel | None
  user_tower: towers.UserTower | ensemble_lib.EnsembleUserTower
  item_tower: towers.ItemTower | ensemble_lib.EnsembleItemTower
  encoder: model_lib.ItemIndexEncoder | ensemble_lib.EnsembleEncoder
  members: tuple = ()
  blend: ease_lib.Blend | None = None


def ensemble(members) -> Built:
  """The ensemble of trained variants: their scores add up."""
  return Built(None, ensemble_lib.EnsembleUserTower(
                   [m.user_tower for m in members]),
               ensemble_lib.EnsembleItemTower([m.item_tower for m in members]),
               ensemble_lib.EnsembleEncoder([m.encoder for m in members]),
               tuple(members))


def member_name(name: str, member: int) -> str:
  """Member `member` (1, 2, ...) of an ensemble of `name`: `name` itself,
  then `name`_2, `name`_3, ... (the same model trained with other seeds)."""
  return name if member == 1 else f"{name}_{member}"


def member_seed(seed: int, member: int) -> int:
  """The seed of member `member` of a run with --seed=`seed`: seed + 1000
  (member - 1), apart from the consecutive seeds of other runs (as
  benchmarks/quality.py's --seeds=1,2,3), so no two runs share a member."""
  return seed + 1000 * (member - 1)


def parse_variant(name: str) -> tuple[str, bool, int, bool]:
  """(trained variant, refit, member, ensemble) of a model's name, e.g.
  'dat_refit_2' -> ('dat', True, 2, False), 'dat_refit_ensemble' ->
  ('dat', True, 1, True). A blend's name (`<model>_ease`) reads as its
  towers'.

  Raises:
    ValueError: the name is not a trained variant's.
  """
  name = name.removesuffix(BLEND_SUFFIX)
  ensemble = name.endswith(ENSEMBLE_SUFFIX)
  stem = name.removesuffix(ENSEMBLE_SUFFIX)
  head, _, tail = stem.rpartition("_")
  member = 1
  if not ensemble and tail.isdigit() and tail == str(int(tail)) and int(
      tail) > 1:
    stem, member = head, int(tail)
  base = stem.removesuffix(REFIT_SUFFIX)
  if base not in TRAINED_VARIANTS:
    raise ValueError(f"{name!r} is not a trained variant; expected one of "
                     f"{TRAINED_VARIANTS}, optionally with {REFIT_SUFFIX!r}, "
                     "then a member number (_2, _3, ...) or "
                     f"{ENSEMBLE_SUFFIX!r}, then {BLEND_SUFFIX!r}.")
  return base, stem.endswith(REFIT_SUFFIX), member, ensemble


def is_refit(name: str) -> bool:
  """Whether the model `name` (a trained variant's, or popularity_refit)
  was fitted on training plus validation events."""
  if name.startswith("popularity"):
    return name.endswith(REFIT_SUFFIX)
  return parse_variant(name)[1]


def variant_configs(name: str, tower: TowerConfig,
                    loss: LossConfig) -> tuple[TowerConfig, LossConfig]:
  """The tower and loss configs of a named variant (AMM and CAL only where
  the variant has them and the configs allow them)."""
  amm = {"id_only": False, "two_tower": False, "dat_no_cal": True,
         "dat": True}[name]
  cal = {"id_only": False, "two_tower": False, "dat_no_cal": False,
         "dat": True}[name]
  amm = amm and tower.use_amm
  cal = cal and loss.use_cal
  # A variant stamps the settings of the parts it lacks at their defaults:
  # its model is the same whatever they are (its loss terms are zero), so
  # they must not make a run directory retrain it.
  defaults, unused = LossConfig(), {}
  if not amm:
    unused.update(lambda_u=defaults.lambda_u, lambda_v=defaults.lambda_v)
  if not cal:
    unused.update(lambda_ca=defaults.lambda_ca)
  return (dataclasses.replace(tower, use_amm=amm,
                              amm_mimic_only=amm and tower.amm_mimic_only,
                              id_only=name == "id_only" or tower.id_only),
          dataclasses.replace(loss, use_cal=cal, **unused))


def build(prep: Prepared, tower_config: TowerConfig,
          loss_config: LossConfig, seed: int = 0,
          precision: str = "float32") -> Built:
  """The towers and the DAT model for one variant.

  `seed` seeds the generator of every training-time random draw (id and
  history dropout, sampled negatives); its state is checkpointed with the
  weights. `precision` is the towers' MLP dtype policy (TrainConfig's);
  the weights are float32 whatever it is, so any build loads them.
  """
  sizes = prep.vocab.sizes()
  table = towers.make_item_table(prep.item_table)
  metadata = towers.ItemFeatureEmbedding(sizes, tower_config.embedding_dim,
                                         name="item_metadata")
  item_tower = towers.ItemTower(sizes, tower_config, metadata,
                                mlp_dtype=precision, name="item_tower")
  user_tower = towers.UserTower(sizes, tower_config, table, metadata,
                                item_id=item_tower.item_id,
                                rng=tf.random.Generator.from_seed(seed),
                                mlp_dtype=precision, name="user_tower")
  encoder = model_lib.ItemIndexEncoder(item_tower, table, name="item_encoder")
  model = model_lib.DATModel(user_tower, encoder, prep.item_probability,
                             loss_config)
  return Built(model, user_tower, item_tower, encoder)


def create_variables(built: Built, prep: Prepared) -> None:
  """Calls both towers once so every variable exists (before restoring)."""
  batch = dummy_batch(prep)
  built.user_tower(batch)
  built.encoder(batch["item"])


def dummy_batch(prep: Prepared) -> dict:
  h = prep.feature_config.history_length
  return {"user_id": tf.constant([1, 1], tf.int64),
          "history": tf.zeros([2, h], tf.int64),
          "item": tf.constant([1, 1], tf.int64)}


def best_weights(model_dir: str, name: str) -> str:
  """The checkpoint prefix of a variant's best weights."""
  return os.path.join(model_dir, "variants", name, "best", "weights")


def load_variant(model_dir: str, config: RunConfig, prep: Prepared,
                 name: str = "dat") -> Built:
  """A trained variant of a run (a name `parse_variant` reads), with its
  best weights; an ensemble's name gives its `config.train.ensemble`
  members together, and `<model>_ease` the model blended with EASE.

  Raises:
    RunError: the variant (or a member, or the blend) was not trained.
  """
  base, refit, member, whole = parse_variant(name)
  if name.endswith(BLEND_SUFFIX):
    if not has_blend(model_dir, name):
      raise RunError(f"{blend_path(model_dir, name)} not found: the run in "
                     f"{model_dir} has no '{name}' (it is trained with "
                     "--ease_weights when validation prefers it).")
    built = load_variant(model_dir, config, prep,
                         name.removesuffix(BLEND_SUFFIX))
    return dataclasses.replace(built, blend=load_blend(model_dir, name))
  if refit != (len(prep.fit_splits) > 1):
    raise ValueError(f"{name!r} needs the prepared data it was fitted on "
                     "(pipeline.refit_view for a refit variant).")
  if whole:
    if config.train.ensemble < 2:
      raise RunError(f"{name!r}: the run in {model_dir} was not trained with "
                     "--ensemble=N > 1.")
    stem = name.removesuffix(ENSEMBLE_SUFFIX)
    return ensemble([load_variant(model_dir, config, prep,
                                  member_name(stem, i))
                     for i in range(1, config.train.ensemble + 1)])
  weights = best_weights(model_dir, name)
  if not has_weights(model_dir, name):
    how = [f"--variants=...,{base}"]
    if refit:
      how.append("--refit")
    if member > 1:
      how.append(f"--ensemble={max(member, config.train.ensemble)}")
      if not refit:
        how.append("--norefit")
    raise RunError(f"{weights}.index not found: the run in {model_dir} has "
                   f"no trained '{name}' (train it with {' '.join(how)}).")
  tower, loss = variant_configs(base, config.tower, config.loss)
  built = build(prep, tower, loss)
  create_variables(built, prep)
  built.model.load_weights(weights).expect_partial()
  return built


def has_weights(model_dir: str, name: str) -> bool:
  """Whether the run has best weights of the variant `name`."""
  return os.path.exists(best_weights(model_dir, name) + ".index")


def blend_path(model_dir: str, name: str, what: str = BLEND_TABLES) -> str:
  """A file of the blend `name` (`<model>_ease`): its tables or its info."""
  return os.path.join(model_dir, "variants", name, what)


def has_blend(model_dir: str, name: str) -> bool:
  return all(os.path.exists(blend_path(model_dir, name, what))
             for what in (BLEND_TABLES, BLEND_INFO))


def load_blend(model_dir: str, name: str) -> ease_lib.Blend:
  with open(blend_path(model_dir, name, BLEND_INFO)) as f:
    info = json.load(f)
  return ease_lib.Blend.load(blend_path(model_dir, name), info)


def exported_stem(train_config: TrainConfig) -> str:
  """The variant a run's config exports, before any ensemble: dat's refit
  with --refit, else dat."""
  return "dat" + (REFIT_SUFFIX if train_config.refit else "")


def exported_variant(model_dir: str) -> str:
  """The model a run exports, as its config asks: dat's refit (with
  --refit, once trained), else dat; with --ensemble=N > 1 and every member
  trained, their ensemble (else, with a warning, the first member); with
  --ease_weights and a blend that validation chose, that model blended with
  EASE."""
  config = read_config(model_dir).train
  stem = exported_stem(config)
  if not has_weights(model_dir, stem):
    stem = "dat"
  if config.ensemble > 1:
    missing = [member_name(stem, i) for i in range(2, config.ensemble + 1)
               if not has_weights(model_dir, member_name(stem, i))]
    if not missing:
      return _blended(model_dir, config, stem + ENSEMBLE_SUFFIX)
    logging.warning("%s asks for --ensemble=%d but %s not trained: the run "
                    "exports %s alone.", model_dir, config.ensemble,
                    ", ".join(missing) + (" is" if len(missing) == 1
                                          else " are"), stem)
  return _blended(model_dir, config, stem)


def _blended(model_dir: str, config: TrainConfig, name: str) -> str:
  """`name` blended with EASE when the run asks for it and has it."""
  if config.ease_weights and has_blend(model_dir, name + BLEND_SUFFIX):
    return name + BLEND_SUFFIX
  return name


def view_for(prep: Prepared, train_config: TrainConfig,
             name: str) -> Prepared:
  """The prepared data variant `name` was fitted on."""
  return refit_view(prep, train_config) if is_refit(name) else prep


# ------------------------------------------------------------- embeddings


def item_embeddings(encoder: model_lib.ItemIndexEncoder, num_items: int,
                    batch_size: int = 8192) -> np.ndarray:
  """[num_items + 1, dim] embeddings of the whole corpus; row 0 is zeros."""
  parts = []
  progress = Progress("embedding the corpus", num_items, "books")
  for start in range(1, num_items + 1, batch_size):
    ids = tf.range(start, min(start + batch_size, num_items + 1), dtype=tf.int64)
    parts.append(encoder(ids)[0].numpy())
    progress.add(int(ids.shape[0]))
  progress.done()
  out = np.concatenate(parts)
  return np.concatenate([np.zeros_like(out[:1]), out])


def test_metrics(score_fn, prep: Prepared, batch_size: int,
                 ks=evaluation.KS,
                 item_counts: np.ndarray | None = None) -> dict:
  """Full-corpus test metrics at cut-offs `ks`, with `segments`
  (evaluation.segment_metrics: by user activity, book popularity, cold
  books and category). Books are segmented by `item_counts` (default
  `prep.item_counts`, the counts of the events `prep`'s models fit on)."""
  metrics, ranked = evaluation.evaluate(score_fn, prep.test, ks=ks,
                                        batch_size=batch_size,
                                        return_ranked=True)
  if ranked is not None:
    metrics["segments"] = evaluation.segment_metrics(
        ranked, prep.test,
        prep.item_counts if item_counts is None else item_counts,
        prep.item_categories)
  return metrics


def batch_seen(batch: dict) -> tf.Tensor:
  """[batch, L] the known books of an evaluation batch's users (0 = pad)."""
  seen = batch["seen"]
  return seen.to_tensor(0) if isinstance(seen, tf.RaggedTensor) else seen


def ease_scorer(columns, values, num_items: int) -> callable:
  """EASE's scores of an evaluation batch's users (from their `seen`)."""
  columns, values = tf.constant(columns), tf.constant(values)
  return lambda batch: ease_lib.scores(  # noqa: E731
      columns, values, batch_seen(batch), num_items)


def model_scorer(built: Built, num_items: int,
                 embeddings: np.ndarray | None = None) -> callable:
  """Scores users against the corpus; `embeddings` as from `item_embeddings`
  (computed here when not given). An ensemble adds up its members' scores
  (the same scores as its combined query vectors, at a fraction of the
  cost); a blend adds EASE's to the towers'."""
  if built.blend is not None:
    towers = model_scorer(dataclasses.replace(built, blend=None), num_items,
                          embeddings)
    ease = ease_scorer(built.blend.columns, built.blend.values, num_items)
    scale = built.blend.tower_scale
    return lambda batch: scale * towers(batch) + ease(batch)  # noqa: E731
  if built.members:
    widths = [m.user_tower.config.output_dim for m in built.members]
    parts = (np.split(embeddings, np.cumsum(widths)[:-1], axis=1)
             if embeddings is not None else [None] * len(widths))
    scorers = [model_scorer(m, num_items, e)
               for m, e in zip(built.members, parts)]
    return lambda batch: tf.add_n([s(batch) for s in scorers])  # noqa: E731
  if embeddings is None:
    embeddings = item_embeddings(built.encoder, num_items)
  query = lambda batch: built.user_tower(batch)[0]  # noqa: E731
  return evaluation.embedding_scorer(query, embeddings)
