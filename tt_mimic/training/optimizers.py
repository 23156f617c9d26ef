"""Adam variants whose embedding updates touch only a batch's rows.

Keras' Adam moves every row of an embedding table at every step, even for
a sparse gradient: the moments of untouched rows decay and their weights
keep stepping. That is three passes over each table and its two slots per
step, which dominates the step at large tables or wide embeddings.

`LazyAdam` updates only the batch's rows and drops the steps in between.
`CatchUpAdam` updates only the batch's rows too, but applies the steps in
between in closed form, so a row follows dense Adam's path.
"""

from __future__ import annotations

import math

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf


def _step_size(optimizer, step, dtype):
  """Adam's alpha at local step `step` (1-based; any shape): the learning
  rate (a schedule's at `step` - 1, as Keras evaluates it), bias-corrected
  (Kingma & Ba, ICLR 2015)."""
  rate = optimizer._learning_rate  # pylint: disable=protected-access
  if isinstance(rate, tf.keras.optimizers.schedules.LearningRateSchedule):
    lr = tf.cast(rate(step - 1), dtype)
  else:
    lr = tf.cast(optimizer.learning_rate, dtype)
  return (lr * tf.sqrt(1 - tf.pow(tf.cast(optimizer.beta_2, dtype), step))
          / (1 - tf.pow(tf.cast(optimizer.beta_1, dtype), step)))


class LazyAdam(tf.keras.optimizers.Adam):
  """Adam whose sparse (embedding) updates touch only the batch's rows.

  The rows a batch touches get the Adam update (Kingma & Ba, ICLR 2015)
  with their moments decayed once per touch; other rows keep their moments
  and weights. Dense gradients get the plain Adam update. (The "lazy" Adam
  of sparse recommenders; the same rule as TensorFlow Addons' LazyAdam,
  written here on tf-keras' optimizer API.)
  """

  def update_step(self, gradient, variable):
    if not isinstance(gradient, tf.IndexedSlices):
      return super().update_step(gradient, variable)
    # The base optimizer has summed duplicate indices already.
    dtype = variable.dtype
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_2 = tf.cast(self.beta_2, dtype)
    alpha = _step_size(self, tf.cast(self.iterations + 1, dtype), dtype)
    key = self._var_key(variable)
    m = self._momentums[self._index_dict[key]]
    v = self._velocities[self._index_dict[key]]
    rows, values = gradient.indices, gradient.values
    m_rows = beta_1 * tf.gather(m, rows) + (1 - beta_1) * values
    v_rows = beta_2 * tf.gather(v, rows) + (1 - beta_2) * tf.square(values)
    m.scatter_update(tf.IndexedSlices(m_rows, rows))
    v.scatter_update(tf.IndexedSlices(v_rows, rows))
    variable.scatter_sub(tf.IndexedSlices(
        alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


class CatchUpAdam(tf.keras.optimizers.Adam):
  """Adam whose embedding rows follow dense Adam's path at LazyAdam's cost.

  Under dense Adam a row that no batch touches still moves: with zero
  gradient its moments decay and its weight keeps stepping by
  alpha_t * m / (sqrt(v) + eps), a tail that adds about nine steps' worth
  after each touch (each step is r = beta_1 / sqrt(beta_2) = 0.90 of the
  one before). LazyAdam drops that tail, most of a rare row's movement.
  Here the k zero-gradient steps since a row's last update at step s are
  applied at once when a batch next touches the row, and to every row by
  `catch_up` before the weights are read (validation, the end of `fit`,
  export). With q = alpha m_s / (sqrt(v_s) + eps):

      m <- beta_1^k m,   v <- beta_2^k v,
      w <- w_s - q sum_{i=1..k} r^i = w_s - q r (1 - r^k) / (1 - r),

  and with weight averaging (`use_ema`, momentum mu) the average of that
  path, a_{s+k} = mu^k a_s + (1 - mu) sum_{j=1..k} mu^(k-j) w_{s+j}:

      a <- mu^k a_s + (1 - mu^k) w_s - q (sum_{i=1..k} r^i
                                          - mu r (mu^k - r^k) / (mu - r))

  (the last term is sum_i r^i mu^(k+1-i); k r^(k+1) at mu = r).

  Approximations, given the same gradients: dense Adam's alpha (the
  bias-corrected learning rate, and a schedule's rate) varies over the k
  steps; one alpha stands for them, taken at step s + (the mean of i under
  the weights r^i). For the weights the error is second order in alpha's
  change: about 1e-3 of the tail for a row last updated at step 100,
  1.4e-4 at step 300, less after; the average's weights have another mean,
  so its error is first order (about 2e-3 at step 100, 1.5e-4 at step
  1000). The eps term is that of step s (exact when eps << sqrt(v)).
  Beyond the path: a batch's forward pass sees its rows before their
  pending steps, which the update then applies, so gradients come from
  slightly older rows than under dense Adam. Dense gradients (and tables
  other than rank 2) get Keras' Adam unchanged.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    unsupported = {"amsgrad": self.amsgrad,
                   "adaptive_epsilon": getattr(self, "adaptive_epsilon", False),
                   "weight_decay": self.weight_decay,
                   "ema_overwrite_frequency": self.ema_overwrite_frequency}
    for name, value in unsupported.items():
      if value:
        raise ValueError(f"CatchUpAdam does not support {name}.")
    if not float(self.beta_1) ** 2 < float(self.beta_2):
      raise ValueError("CatchUpAdam needs beta_1^2 < beta_2 (the tail of "
                       "zero-gradient steps must shrink).")

  def build(self, var_list):
    if getattr(self, "_built", False):
      return
    super().build(var_list)
    # Per table row: the step its state was last brought up to (0 = never
    # touched, so its moments are 0 and it has nothing to catch up).
    # float32, as the table: exact up to 2^24 steps (checked).
    # Checkpointed through the optimizer's variable list; the dict itself
    # (keyed by per-process variable ids) is not tracked.
    self._last_steps = self._no_dependency({})
    for var in var_list:
      if var.shape.rank == 2:
        self._last_steps[self._var_key(var)] = (
            self.add_variable_from_reference(var, "last_step",
                                             shape=[var.shape[0]]))
    # Tables updated row-wise in the traced step (their average too).
    self._sparse_keys = set()

  def _advance(self, m, v, w, average, last, k):
    """The state after k zero-gradient steps from step `last`.

    Args:
      m, v, w, average: [rows, dim] moments, weights and weight average (or
        None) as of step `last`.
      last: [rows, 1] float step of that state.
      k: [rows, 1] float, >= 0: the steps to apply.
    """
    dtype = m.dtype
    # The per-row factors in float64 ([rows, 1]: cheap), so mu near r and
    # long gaps keep their precision.
    k64 = tf.cast(k, tf.float64)
    r = float(self.beta_1) / math.sqrt(float(self.beta_2))
    r_k = tf.pow(tf.constant(r, tf.float64), k64)
    tail = r * (1 - r_k) / (1 - r)  # sum_{i=1..k} r^i
    # The mean of i under the weights r^i, i = 1..k (1 where k < 1).
    mean_i = tf.where(
        k64 >= 1, 1 / (1 - r) - k64 * r_k / tf.maximum(1 - r_k, 1e-12), 1.)
    alpha = _step_size(self, last + tf.cast(mean_i, dtype), dtype)
    q = alpha * m / (tf.sqrt(v) + self.epsilon)
    new_w = w - q * tf.cast(tail, dtype)
    if average is not None:
      mu = float(self.ema_momentum)
      mu_k = tf.pow(tf.constant(mu, tf.float64), k64)
      if abs(mu - r) > 1e-9:
        late = mu * r * (mu_k - r_k) / (mu - r)
      else:
        late = k64 * r_k * r
      mu_k32 = tf.cast(mu_k, dtype)
      average = (mu_k32 * average + (1 - mu_k32) * w
                 - q * tf.cast(tail - late, dtype))
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_2 = tf.cast(self.beta_2, dtype)
    return tf.pow(beta_1, k) * m, tf.pow(beta_2, k) * v, new_w, average

  def _slots(self, variable):
    index = self._index_dict[self._var_key(variable)]
    average = (self._model_variables_moving_average[index] if self.use_ema
               else None)
    return self._momentums[index], self._velocities[index], average

  def update_step(self, gradient, variable):
    key = self._var_key(variable)
    if (not isinstance(gradient, tf.IndexedSlices)
        or key not in self._last_steps):
      return super().update_step(gradient, variable)
    self._sparse_keys.add(key)
    # The base optimizer has summed duplicate indices already.
    rows, values = gradient.indices, gradient.values
    dtype = variable.dtype
    step = tf.cast(self.iterations + 1, dtype)
    alpha = _step_size(self, step, dtype)
    m, v, average = self._slots(variable)
    last = self._last_steps[key]
    tf.debugging.assert_less(step, tf.cast(2 ** 24, dtype), message=(
        "CatchUpAdam's step counters are exact up to 2^24 steps."))
    last_r = tf.gather(last, rows)[:, None]
    m_r, v_r, w_r, a_r = self._advance(
        tf.gather(m, rows), tf.gather(v, rows), tf.gather(variable, rows),
        None if average is None else tf.gather(average, rows),
        last_r, step - 1 - last_r)
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_2 = tf.cast(self.beta_2, dtype)
    m_r = beta_1 * m_r + (1 - beta_1) * values
    v_r = beta_2 * v_r + (1 - beta_2) * tf.square(values)
    w_r = w_r - alpha * m_r / (tf.sqrt(v_r) + self.epsilon)
    m.scatter_update(tf.IndexedSlices(m_r, rows))
    v.scatter_update(tf.IndexedSlices(v_r, rows))
    variable.scatter_update(tf.IndexedSlices(w_r, rows))
    if average is not None:
      mu = tf.cast(self.ema_momentum, dtype)
      average.scatter_update(
          tf.IndexedSlices(mu * a_r + (1 - mu) * w_r, rows))
    last.scatter_update(tf.IndexedSlices(
        tf.fill(tf.shape(rows), step), rows))

  def _update_model_variables_moving_average(self, var_list):
    # The row-wise tables updated their average in update_step.
    super()._update_model_variables_moving_average(
        [var for var in var_list
         if self._var_key(var) not in self._sparse_keys])

  def catch_up(self, var_list):
    """Brings every row of `var_list`'s tables up to the current step (a
    dense pass over each table with pending rows, for reading the weights).

    Rows never touched keep their average, which equals their weights
    unless the weights were set after the optimizer was built."""
    if not getattr(self, "_built", False):
      return
    steps = int(tf.keras.backend.get_value(self.iterations))
    if steps == 0:
      return
    if steps >= 2 ** 24:
      raise ValueError("CatchUpAdam's step counters are exact up to 2^24 "
                       "steps.")
    for variable in var_list:
      last = self._last_steps.get(self._var_key(variable))
      if last is None:
        continue
      dtype = variable.dtype
      step = tf.cast(steps, dtype)
      # Tables that only get dense gradients have no touched row.
      touched = last > 0
      if not bool(tf.reduce_any(touched & (last < step))):
        continue
      k = tf.where(touched, step - last, tf.zeros_like(last))[:, None]
      m, v, average = self._slots(variable)
      m_new, v_new, w_new, a_new = self._advance(
          m, v, variable, average, last[:, None], k)
      m.assign(m_new)
      v.assign(v_new)
      variable.assign(w_new)
      if average is not None:
        average.assign(a_new)
      last.assign(tf.where(touched, step, last))

  def finalize_variable_values(self, var_list):
    self.catch_up(var_list)
    super().finalize_variable_values(var_list)
