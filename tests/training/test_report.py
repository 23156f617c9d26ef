"""report.segments: the segment tables of one run and of several seeds."""

from tt_mimic.training import report


def _run(dat_short: float, tower_short: float | None = None) -> dict:
  def variant(short):
    return {"recall@20": 0.5, "segments": {"user_activity": {
        "1-2": {"users": 7, "recall@20": short},
        "51+": {"users": 3, "recall@20": 0.25}}}}

  run = {"dat": variant(dat_short),
         "als": {**variant(0.3), "params": {"factors": 8}}}
  if tower_short is not None:
    run["two_tower"] = variant(tower_short)
  return run


def _rows(lines: list[str], title: str) -> dict:
  """{segment: [cells]} of the table under `title`."""
  start = lines.index(title)
  rows = {}
  for line in lines[start + 4:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return rows


def test_one_run_gives_plain_values():
  lines = report.segments(_run(0.125, 0.5))
  rows = _rows(lines, "### Recall@20, users by known events")
  assert lines[lines.index("### Recall@20, users by known events") + 2] == (
      "| segment | n | dat | als | two_tower |")
  assert rows["1-2"] == ["7", "0.1250", "0.3000", "0.5000"]
  assert rows["51+"] == ["3", "0.2500", "0.2500", "0.2500"]


def test_seeds_give_mean_and_spread_and_mark_what_is_missing():
  # two_tower ran on the second seed only: its cell is that seed's value.
  lines = report.segments([_run(0.1), _run(0.3, 0.5)])
  rows = _rows(lines, "### Recall@20, users by known events")
  assert rows["1-2"] == ["7", "0.2000 ± 0.1000", "0.3000 ± 0.0000",
                         "0.5000 ± 0.0000 (1 of 2 seeds)"]
  # A kind no variant has gets a table without rows.
  assert _rows(lines, "### Recall@20, held-out books by top-level category") \
      == {}


def test_no_segments_no_tables():
  assert report.segments([{"dat": {"recall@20": 0.1}}]) == []
  assert report.segments({}) == []
