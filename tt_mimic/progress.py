"""Progress lines for long loops: done/total, rate and time left.

Silent for loops that finish within `every` seconds, so small runs and
tests print nothing; at full size each long phase (evaluation, embedding the
corpus, batch scoring) logs a line every `every` seconds.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, TypeVar

from absl import logging

T = TypeVar("T")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class Progress:
  """Counts work done and logs it at most every `every` seconds.

  Example:
    progress = Progress("evaluating", total=len(users), unit="users")
    for batch in batches:
      ...
      progress.add(len(batch))
    progress.done()
  """

  def __init__(self, what: str, total: int | None = None, unit: str = "",
               every: float = 10.0):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.count = 0
    self.start = self.last = time.monotonic()
    self.logged = False

  def add(self, n: int = 1) -> None:
    self.count += n
    now = time.monotonic()
    if now - self.last >= self.every:
      self.last = now
      self.logged = True
      logging.info("%s", self.line(now))

  def line(self, now: float | None = None) -> str:
    elapsed = max((now or time.monotonic()) - self.start, 1e-9)
    rate = self.count / elapsed
    text = f"{self.what}: {self.count}"
    if self.total:
      text += f"/{self.total} ({self.count / self.total:.0%})"
    text += f" {self.unit}".rstrip() + f", {rate:,.0f}/s, {_duration(elapsed)}"
    if self.total and rate > 0 and self.count < self.total:
      text += f", about {_duration((self.total - self.count) / rate)} left"
    return text

  def done(self) -> None:
    """Logs the final line if anything was logged before."""
    if self.logged:
      logging.info("%s (done)", self.line())


def track(items: Iterable[T], what: str, total: int | None = None,
          unit: str = "", every: float = 10.0) -> Iterator[T]:
  """Yields `items`, logging progress by item."""
  progress = Progress(what, total, unit, every)
  for item in items:
    yield item
    progress.add(1)
  progress.done()
