"""Progress lines: silent when fast, rate and time left when slow."""

from unittest import mock

from tt_mimic import progress


def test_silent_when_fast():
  with mock.patch.object(progress.logging, "info") as info:
    assert list(progress.track(range(5), "fast", 5)) == [0, 1, 2, 3, 4]
  info.assert_not_called()


def test_logs_rate_and_time_left():
  clock = iter([0.0, 20.0, 40.0, 40.0])
  with mock.patch.object(progress.time, "monotonic", lambda: next(clock)), \
       mock.patch.object(progress.logging, "info") as info:
    p = progress.Progress("embedding", total=100, unit="books", every=10)
    p.add(25)   # at 20 s: 25 done, 1.25/s, 60 s left
    p.add(25)   # at 40 s
    p.done()
  calls = [call.args for call in info.call_args_list]
  assert calls[0] == ("%s", "embedding: 25/100 (25%) books, 1/s, 20s, "
                            "about 1m00s left")
  assert calls[-1] == ("%s (done)", "embedding: 50/100 (50%) books, 1/s, 40s, "
                                    "about 40s left")
