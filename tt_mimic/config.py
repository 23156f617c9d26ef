"""The frozen configs of a run: the one set of defaults and their rules.

Every setting of the library lives in one of these dataclasses. Each field
carries its help text and its bounds or choices (`setting`); the command
layer turns the fields into absl flags with the same names (`flag` where a
flag is named otherwise), so the command line and the Python API share the
defaults and refuse the same values: `__post_init__` checks every bound,
choice and cross-field rule and raises `ValueError` with the reason.

`RunConfig` gathers them; a run directory holds it as `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import typing

# -------------------------------------------------------------- the helpers

VARIANTS = ("popularity", "id_only", "two_tower", "dat_no_cal", "dat")
KS = (10, 20, 50, 100)
METRICS = tuple(f"{m}@{k}" for m in ("recall", "ndcg", "hr") for k in KS) + (
    "mrr",)


def setting(default, help: str, *, lower=None, upper=None, choices=None,
            flag: str | None = None, each=None):  # pylint: disable=redefined-builtin
  """A config field with its help text and the values it accepts.

  Args:
    default: the default (the only one in the project).
    help: one-line help, shown by `--help`.
    lower, upper: inclusive bounds of a number.
    choices: allowed values of a string (for a tuple: of each element).
    flag: the flag's name when it is not the field's.
    each: for a tuple, the type of its elements (int or str).
  """
  return dataclasses.field(default=default, metadata={
      "help": help, "lower": lower, "upper": upper, "choices": choices,
      "flag": flag, "each": each})


def check_fields(config) -> None:
  """Raises ValueError for any field outside its bounds or choices."""
  name = type(config).__name__
  for field in dataclasses.fields(config):
    meta, value = field.metadata, getattr(config, field.name)
    label = f"{name}.{field.name} (--{meta.get('flag') or field.name})"
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
      if meta.get("lower") is not None and v < meta["lower"]:
        raise ValueError(f"{label} = {value!r} is below {meta['lower']}.")
      if meta.get("upper") is not None and v > meta["upper"]:
        raise ValueError(f"{label} = {value!r} is above {meta['upper']}.")
      if meta.get("choices") is not None and v not in meta["choices"]:
        raise ValueError(f"{label} = {v!r} is not one of "
                         f"{list(meta['choices'])}.")


class _Checked:
  """Checks bounds and choices on construction; subclasses add rules."""

  def __post_init__(self):
    check_fields(self)
    self.check()

  def check(self) -> None:
    """Cross-field rules; raise ValueError."""


# --------------------------------------------------------------- the configs


@dataclasses.dataclass(frozen=True)
class IngestConfig(_Checked):
  """What to read and how to filter and split it."""
  books_csv: str = setting("data/books.csv", "Books: books.csv, or the "
                           "Amazon release's meta_Books.jsonl (either may be "
                           "gzipped).")
  users_csv: str = setting("data/users.csv", "Events: users.csv, or the "
                           "Amazon release's Books.jsonl reviews (either may "
                           "be gzipped).")
  input_format: str = setting("auto", "Format of --books_csv and "
                              "--users_csv: auto = by each file's name "
                              "(.jsonl, .json, .ndjson, optionally .gz: "
                              "JSON Lines; anything else: CSV).",
                              choices=("auto", "csv", "jsonl"))
  min_rating: float = setting(0.0, "Keep only events rated at least this "
                              "(0 = keep all); needs ratings in the users "
                              "file (a rating column or JSON field).",
                              lower=0.0)
  books_limit: int = setting(2_000_000, "First N valid books (0 = all).",
                             lower=0)
  interactions_limit: int = setting(200_000,
                                    "First N valid events (0 = all).", lower=0)
  min_user_interactions: int = setting(5, "k-core threshold for users.",
                                       lower=1)
  min_item_interactions: int = setting(10, "k-core threshold for books.",
                                       lower=1)
  split: str = setting("leave_last_out", "Evaluation split: the last event "
                       "of each user is test, the one before validation; or a "
                       "global time cut-off.",
                       choices=("leave_last_out", "temporal"))
  split_cutoff_ms: int = setting(0, "Temporal split: events at or after it "
                                 "are test (0 = 90th percentile of event "
                                 "times).", lower=0)
  val_fraction: float = setting(0.1, "Temporal split: latest share of "
                                "earlier events used for validation.",
                                lower=0.0, upper=0.5)


@dataclasses.dataclass(frozen=True)
class FeatureConfig(_Checked):
  """Vocabulary caps and sequence lengths."""
  category_top_k: int = setting(300, "Category vocabulary size.", lower=1)
  author_top_k: int = setting(5000, "Author vocabulary size.", lower=1)
  title_max_tokens: int = setting(20000, "Title vocabulary size.", lower=2)
  title_length: int = setting(12, "Title tokens per book.", lower=1)
  title_standardize: str = setting(
      "unicode", "How titles are standardized before they are split into "
      "tokens: ascii = lower-case A-Z and strip ASCII punctuation (Keras' "
      "default); unicode = tensorflow-text case folding with NFKC, "
      "stripping Unicode punctuation and symbols (accents kept).",
      choices=("ascii", "unicode"))
  max_categories: int = setting(4, "Category tokens kept per book.", lower=1)
  history_length: int = setting(50, "Recent training events per user used "
                                "as features (0: none, the towers of the DAT "
                                "paper).", lower=0)


@dataclasses.dataclass(frozen=True)
class TowerConfig(_Checked):
  """Sizes and inputs of the towers.

  `use_amm` makes the augmented vectors a_u, a_v exist; the mimic losses
  follow from them (there is no second switch in `LossConfig`).
  """
  embedding_dim: int = setting(128, "Feature embedding width.", lower=1)
  hidden_units: tuple[int, ...] = setting((256,), "ReLU layer widths of each "
                                          "tower.", lower=1, each=int)
  output_dim: int = setting(128, "Tower output (and a_u, a_v) width.",
                            lower=1)
  dropout: float = setting(0.0, "Dropout after hidden layers.", lower=0.0,
                           upper=0.9)
  use_amm: bool = setting(True, "Adaptive-Mimic Mechanism (a_u, a_v and "
                          "their mimic losses).")
  amm_mimic_only: bool = setting(
      False, "a_u and a_v are trained by their mimic losses alone: the "
      "towers read them as fixed inputs (stop-gradient), so the main loss "
      "cannot make a_u a free user-id embedding. Off: the main loss also "
      "trains them through the towers' inputs.")
  user_id_dropout: float = setting(0.1, "Training-time chance of hiding the "
                                   "user id.", lower=0.0, upper=1.0)
  recent_length: int = setting(0, "Also pool the user's N most recent "
                               "history books on their own (0: only the pool "
                               "of the whole history).", lower=0)
  user_id_embedding: bool = setting(False, "Give the user tower a free "
                                    "user-id embedding (without it, a user "
                                    "is their history, plus a_u under AMM).")
  id_only: bool = setting(False, "Towers that are only a user-id and an "
                          "item-id embedding (the plain TFRS two-tower; the "
                          "id_only variant).")
  share_item_embedding: bool = setting(False, "The user tower embeds its "
                                       "history books with the item tower's "
                                       "id embedding (else a table of its "
                                       "own).")
  history_dropout: float = setting(0.0, "Training-time chance of hiding a "
                                   "user's whole history.", lower=0.0,
                                   upper=1.0)
  history_item_dropout: float = setting(
      0.0, "Training-time chance of hiding each book of a user's history "
      "on its own (denoising, as the input dropout of Mult-DAE, Liang et al. "
      "2018).", lower=0.0, upper=0.95)
  history_attention: int = setting(
      0, "Attention pools of the history beside its mean: each weights the "
      "user's books by a learned score of the book's features and a learned "
      "recency decay (structured self-attention, Lin et al. 2017); 0 = the "
      "mean only.", lower=0)
  id_residual: bool = setting(
      False, "Add a linear id path to each tower's output before its "
      "normalization: the candidate's own output-width id embedding, and the "
      "mean of the history books' embeddings in a second table (an "
      "item-item model like FISM, Kabbur et al. 2013, beside the MLP). "
      "ID-only towers have no MLP and ignore it.")
  interests: int = setting(
      4, "Query vectors per user (multi-interest, ComiRec-SA, Cen et al. "
      "2020): each has its own attention pool of the history; training, "
      "evaluation and retrieval score a book by the user's best vector "
      "(the mimic target is the vector nearest the example's book); 1 = "
      "one vector.", lower=1)


@dataclasses.dataclass(frozen=True)
class LossConfig(_Checked):
  """Main loss and DAT's extra terms."""
  loss: str = setting("softmax", "Main loss: in-batch softmax (TFRS "
                      "Retrieval, log-Q corrected) or DAT's BCE with "
                      "negatives.", choices=("softmax", "bce"))
  temperature: float = setting(0.05, "Score temperature.", lower=1e-4)
  log_q: bool = setting(True, "Log-Q correction (softmax).")
  uniform_negatives: int = setting(0, "Uniform corpus negatives mixed into "
                                   "the softmax per batch; at or above the "
                                   "corpus size, the whole corpus.", lower=0)
  bce_negatives: int = setting(4, "Negatives per positive for --loss=bce.",
                               lower=1)
  use_cal: bool = setting(True, "Category Alignment Loss.")
  lambda_u: float = setting(0.5, "Weight of loss_u.", lower=0.0)
  lambda_v: float = setting(0.5, "Weight of loss_v.", lower=0.0)
  lambda_ca: float = setting(1.0, "Weight of loss_CA.", lower=0.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Checked):
  """Optimization, early stopping and evaluation."""
  batch_size: int = setting(256, "Batch size.", lower=2)
  epochs: int = setting(10, "Maximum epochs.", lower=1)
  optimizer: str = setting(
      "adam", "Optimizer (lazy_adam: Adam that updates only the embedding "
      "rows a batch touches; catchup_adam: the same, with the skipped steps "
      "of dense Adam applied in closed form when a row is next touched).",
      choices=("adam", "lazy_adam", "catchup_adam", "adagrad", "adamw"))
  learning_rate: float = setting(1e-3, "Learning rate (the peak, with a "
                                 "schedule).", lower=0.0)
  lr_schedule: str = setting("constant", "Learning-rate schedule: constant, "
                             "or cosine decay to 0 over --epochs.",
                             choices=("constant", "cosine"))
  weight_decay: float = setting(1e-4, "AdamW weight decay.", lower=0.0)
  train_history: str = setting(
      "other", "History of a training example: other = the user's latest "
      "training events but the example's own (the whole history, as at "
      "serving time; best on the Amazon sets); causal = only the user's "
      "events strictly before it (best where the order of reading carries "
      "the signal, such as series: goodbooks400).",
      choices=("causal", "other"))
  user_weight_power: float = setting(
      0.0, "A training event's weight in the main loss: n^-power for a user "
      "with n training events, scaled to a mean of 1 over the events. 0 = "
      "every event alike; 1 = every user alike (as YouTube's fixed number "
      "of examples per user, Covington et al. 2016), so the most active "
      "users do not dominate the loss.", lower=0.0, upper=1.0)
  ema_momentum: float = setting(
      0.99, "Weight averaging: validation, the best and refit weights and the "
      "export use an exponential moving average of the trained weights with "
      "this momentum (e.g. 0.99; 0 = off, the raw weights).", lower=0.0,
      upper=0.9999)
  early_stopping_metric: str = setting(
      "recall@20", "Validation metric for early stopping and best weights.",
      choices=METRICS)
  patience: int = setting(2, "Early-stopping patience (0 = off).", lower=0)
  eval_batch_size: int = setting(256, "Users scored at once in evaluation.",
                                 lower=1)
  eval_max_users: int = setting(20000, "Users evaluated per split (0 = all).",
                                lower=0)
  seed: int = setting(42, "Random seed (TF, NumPy, shuffles, samples).")
  verbose: int = setting(1, "Keras progress: 0, 1 or 2.", lower=0, upper=2)
  distribute: str = setting("none", "tf.distribute strategy: mirrored = all "
                            "local GPUs; multi_worker = MultiWorkerMirrored"
                            "Strategy with the cluster in TF_CONFIG.",
                            choices=("none", "mirrored", "multi_worker"))
  precision: str = setting(
      "float32", "Compute dtype of the towers' MLPs in training: "
      "mixed_float16 (GPUs; with loss scaling) or mixed_bfloat16 (recent "
      "GPUs and CPUs). Variables, embeddings, the L2 normalization, the "
      "softmax and every loss stay float32; serving computes in float32.",
      choices=("float32", "mixed_float16", "mixed_bfloat16"))
  refit: bool = setting(True, "After validation has chosen the epochs, "
                        "retrain dat on training plus validation events for "
                        "that many epochs; that model (dat_refit) is exported.")
  ensemble: int = setting(
      1, "Members of the exported model: with N > 1, the exported variant "
      "(dat_refit, or dat with --norefit) is trained N-1 more times with "
      "seeds --seed+1000, --seed+2000, ..., for the epochs validation chose, "
      "and the members' scores add up (dat_refit_ensemble: one two-tower model "
      "whose vectors are the members' side by side; N times the training "
      "of the refit, N times the width and interests^N query vectors, at "
      "most 64). With --norefit the members train dat's best number of "
      "epochs without early stopping, as a refit does.",
      lower=1, upper=4)
  ease_weights: tuple[float, ...] = setting(
      (0.1, 0.2, 0.3), "Blend EASE (Steck 2019) into the exported model: "
      "its scores are added to the towers' as (1-w) towers/s_t + w EASE/s_e "
      "(s_t, s_e: each model's median per-user score spread), with w chosen "
      "on validation Recall@20 among these and 0 (the towers alone); EASE is "
      "fitted on the same events as the towers. Empty = no blend. Above "
      "--ease_max_items books, EASE is fitted on neighbourhoods "
      "(--ease_neighbours).", lower=0.0, upper=0.99,
      each=float)
  ease_lambdas: tuple[float, ...] = setting(
      (50.0, 200.0, 500.0), "EASE's L2 weights tried on validation (EASE "
      "alone, Recall@20) for the blend.", lower=1e-3, each=float)
  ease_popularity_powers: tuple[float, ...] = setting(
      (0.0, 0.25, 0.5), "Powers beta tried on validation with each of "
      "--ease_weights: the blend divides EASE's score of a book by its "
      "events in EASE's fit (training, plus validation for a refit) to the "
      "beta (0 = EASE as fitted; larger favours less-read books).",
      lower=0.0, upper=2.0, each=float)
  ease_top_k: int = setting(
      512, "Weights kept per book of EASE's books x books matrix for the "
      "blend (those of the largest magnitude): the export holds books x "
      "this (index, weight) pairs, and a user's EASE scores add up this "
      "many per known book.", lower=1)
  ease_max_items: int = setting(
      20_000, "Largest corpus the blend fits exact EASE on: it inverts a "
      "dense books x books matrix, about four of them at peak (6 GiB at "
      "20,000 books). Above it, --ease_neighbours.", lower=1)
  ease_neighbours: int = setting(
      256, "Above --ease_max_items books, the blend fits EASE on "
      "neighbourhoods: each book's weights regress on its N books of the "
      "most co-reads only (one N x N solve per book and lambda, no books x "
      "books matrix). 0 = no blend above the cap.", lower=0)
  variants: tuple[str, ...] = setting(VARIANTS, "Variants to train and "
                                      "compare; 'dat' is the exported model.",
                                      choices=VARIANTS, each=str)

  def check(self) -> None:
    if self.optimizer == "catchup_adam" and self.precision == "mixed_float16":
      # The loss scaler skips steps with non-finite gradients but counts
      # them; the catch-up would take them for zero-gradient steps.
      raise ValueError("--optimizer=catchup_adam does not support "
                       "--precision=mixed_float16 (mixed_bfloat16 needs no "
                       "loss scaling).")
    if self.ease_weights and not self.ease_popularity_powers:
      raise ValueError("--ease_weights blends EASE, which needs at least one "
                       "of --ease_popularity_powers (0 = EASE as fitted).")


@dataclasses.dataclass(frozen=True)
class ExportConfig(_Checked):
  """What the exported indexes return and how ScaNN is built.

  ScaNN parameters at 0 are picked from the corpus size.
  """
  export: bool = setting(True, "Export SavedModels and indexes after "
                         "training.")
  k: int = setting(100, "Results per query of the exported indexes.",
                   lower=1, flag="export_k")
  max_exclusions: int = setting(100, "Extra results retrieved so that "
                                "excluded books can be dropped.", lower=0)
  scann_num_leaves: int = setting(0, "ScaNN leaves (0 = from corpus size).",
                                  lower=0)
  scann_leaves_to_search: int = setting(0, "ScaNN leaves searched (0 = from "
                                        "corpus size).", lower=0)
  scann_reorder: int = setting(0, "ScaNN exact reordering candidates (0 = "
                               "from corpus size).", lower=0)
  scann_min_recall: float = setting(
      0.95, "Least top-k agreement with brute force (on a sample of the "
      "run's users) the ScaNN index must reach: with automatic settings, the "
      "searched leaves are doubled until it does (0 = build once).",
      lower=0.0, upper=1.0)
  recommend_k: int = setting(10, "Recommendations printed after training.",
                             lower=0)


@dataclasses.dataclass(frozen=True)
class ServeConfig(_Checked):
  """How an export is queried and served (not part of a run's config)."""
  index: str = setting("scann", "Exported index to query.",
                       choices=("scann", "brute_force"))
  k: int = setting(10, "Results per user (at most the export's k).", lower=1)
  host: str = setting("127.0.0.1", "Address to listen on.")
  port: int = setting(8501, "Port to listen on (0 = any free port).",
                      lower=0, upper=65535)
  model_name: str = setting("tt_mimic", "Model name in the URL paths.")
  max_body_bytes: int = setting(1 << 20, "Largest request body accepted "
                                "(413 above).", lower=1)
  max_batch: int = setting(256, "Most users in one request.", lower=1)
  max_history: int = setting(1000, "Most history entries per user.", lower=0)
  request_timeout: float = setting(30.0, "Seconds a client may take to send "
                                   "its request, from its first byte (408 "
                                   "after).", lower=0.1)
  keepalive_timeout: float = setting(5.0, "Seconds a kept-alive connection "
                                     "may stay idle before its next request.",
                                     lower=0.1)
  workers: int = setting(64, "Threads answering connections (a fixed pool; "
                         "each holds one connection at a time).", lower=1,
                         upper=4096)
  pending_connections: int = setting(
      256, "Accepted connections waiting for a worker; when they are this "
      "many the server stops accepting, and new connections wait in the "
      "listen backlog.", lower=1)
  reload_interval: float = setting(2.0, "Seconds between checks for a new "
                                   "export version (tt-mimic catalog); 0 = "
                                   "never reload.", lower=0.0)


SECTIONS = {"ingest": IngestConfig, "features": FeatureConfig,
            "tower": TowerConfig, "loss": LossConfig, "train": TrainConfig,
            "export": ExportConfig}


# An ensemble's query vectors (interests^members) cap: each is a search.
MAX_QUERY_VECTORS = 64

@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every config of a run; written to `<model_dir>/config.json`."""
  ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
  features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
  tower: TowerConfig = dataclasses.field(default_factory=TowerConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

  def __post_init__(self):
    if self.features.history_length == 0 and not self.tower.user_id_embedding:
      raise ValueError(
          "--history_length=0 with --nouser_id_embedding leaves the user "
          "tower no input that tells users apart; keep one of them.")
    if self.tower.interests > 1 and self.features.history_length == 0:
      raise ValueError(
          f"--interests={self.tower.interests} needs a history to pool "
          "(each interest is an attention pool of it); with "
          "--history_length=0 give --interests=1.")
    vectors = self.tower.interests ** self.train.ensemble
    if self.train.ensemble > 1 and vectors > MAX_QUERY_VECTORS:
      raise ValueError(
          f"--ensemble={self.train.ensemble} with --interests="
          f"{self.tower.interests} gives {vectors} query vectors per user "
          f"(interests^members); at most {MAX_QUERY_VECTORS} are allowed "
          "(each one is a search at serving time): use fewer members or "
          "interests.")
    if self.tower.recent_length and (
        self.tower.recent_length >= self.features.history_length):
      raise ValueError(
          "--recent_length must be smaller than --history_length (at or "
          "above it, the recent pool repeats the whole-history pool).")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "RunConfig":
    """The inverse of `to_json`; unknown keys are an error. A missing key
    is a setting added after the run was made: it takes what the code did
    then, its `BEFORE_SETTING` value, else the default."""
    raw = _moved(json.loads(text))
    unknown = set(raw) - set(SECTIONS)
    if unknown:
      raise ValueError(f"Unknown config sections {sorted(unknown)}.")
    sections = {}
    for name, section in SECTIONS.items():
      before = {f.name: BEFORE_SETTING[f.name]
                for f in dataclasses.fields(section)
                if f.name in BEFORE_SETTING}
      sections[name] = from_dict(section, {**before, **raw.get(name, {})})
    return cls(**sections)


def _plain(value):
  """`value` as JSON would give it back (tuples as lists, others as str)."""
  return json.loads(json.dumps(value, default=str))


# What a setting whose default changed when it was added did before it
# existed: a stamp or saved state without it was made with this value, not
# the default (read by same_settings and features.load_vocabularies).
BEFORE_SETTING = {"ease_weights": (), "ease_popularity_powers": (0.0,),
                  "title_standardize": "ascii",
                  "ema_momentum": 0.0,
                  "train_history": "causal", "interests": 1}


# Settings that moved between sections: name -> (old section, new section).
# Stamps and configs saved before the move hold them in the old one.
MOVED_SETTINGS = {"train_history": ("features", "train")}


def _moved(saved: dict) -> dict:
  """`saved` (a run config or stamp, as JSON gives it back) with moved
  settings in their current sections. A stamp without the new section (the
  preprocessing state's, which holds only features) drops them: they do not
  shape what it stamps."""
  saved = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for name, (old, new) in MOVED_SETTINGS.items():
    if isinstance(saved.get(old), dict) and name in saved[old]:
      value = saved[old].pop(name)
      if isinstance(saved.get(new), dict):
        saved[new].setdefault(name, value)
  return saved


def same_settings(saved, current) -> bool:
  """Whether a stamp saved in a run directory matches the current settings.

  Both are nested dicts of settings (dataclasses.asdict of the configs). A
  setting missing from the saved stamp, because the directory was made
  before the setting existed, matches when its current value is what the
  older code did: the default, or its `BEFORE_SETTING` value.
  """
  saved, current = _moved(_plain(saved)), _plain(current)
  defaults = _plain({f.name: f.default for cls in SECTIONS.values()
                     for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING})
  defaults.update(BEFORE_SETTING)

  def same(a, b):
    if not (isinstance(a, dict) and isinstance(b, dict)):
      return a == b
    if a.keys() - b.keys():
      return False
    return all(same(a[key], b[key]) if key in a else
               key in defaults and b[key] == defaults[key] for key in b)
  return same(saved, current)


def from_dict(cls, values: dict):
  """A config of `cls` from a dict (lists become tuples)."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(values) - names
  if unknown:
    raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}.")
  hints = typing.get_type_hints(cls)
  out = {}
  for name, value in values.items():
    if typing.get_origin(hints[name]) is tuple:
      value = tuple(value)
    out[name] = value
  return cls(**out)
