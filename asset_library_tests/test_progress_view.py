"""What a running ingest shows: finished lines stay, running shards are redrawn on a terminal
and printed at each tenth in a log; progress goes through the shard's own progress file."""

from __future__ import annotations

import io
import time

from asset_library.ingest.progress import read_progress, write_progress
from asset_library.layout import LibraryLayout
from asset_library.runs.orchestrate import RunningShard
from asset_library.runs.progress_view import ProgressView, describe, format_seconds


def test_a_progress_file_round_trips_and_gives_an_eta(tmp_path):
    layout = LibraryLayout.open(tmp_path / "library")
    path = layout.progress_path("b-s00001")
    assert read_progress(path) is None  # not started
    write_progress(path, 250, 1000, 50.0)
    progress = read_progress(path)
    assert progress is not None and (progress.done, progress.total) == (250, 1000)
    assert progress.eta_seconds == 15.0
    assert list(path.parent.iterdir()) == [path]  # written atomically: no temporary left
    state = RunningShard("b-s00001", 2, time.monotonic(), progress)
    assert describe(state) == (
        "      b-s00001 (attempt 2): 250/1,000 images (25%), 50.0 img/s, ETA 15 s"
    )
    assert format_seconds(3725) == "1 h 02 min" and format_seconds(61) == "1 min 01 s"


def test_a_terminal_redraws_the_running_shards_below_the_finished_lines():
    out = io.StringIO()
    view = ProgressView(out, tty=True)
    running = [RunningShard("b-s00000", 1, time.monotonic()), RunningShard("b-s00001", 1, 0.0)]
    view.running(running)
    view.running(running)
    view.line("[1/2] b-s00000: done")
    view.close()
    text = out.getvalue()
    # Two live lines drawn twice; each redraw and the finished line first erase the two before.
    assert text.count("b-s00000: starting") == 2 and text.count("\x1b[1A\x1b[2K") == 4
    assert text.endswith("[1/2] b-s00000: done\n")


def test_a_log_gets_a_line_per_tenth_not_per_call(tmp_path):
    out = io.StringIO()
    view = ProgressView(out, tty=False)
    layout = LibraryLayout.open(tmp_path / "library")
    path = layout.progress_path("b-s00000")
    state = RunningShard("b-s00000", 1, time.monotonic() - 5)
    for done in (5, 10, 15, 20, 25):  # a tenth of 200 is 20
        write_progress(path, done, 200, 10.0)
        state.progress = read_progress(path)
        view.running([state])
    assert out.getvalue().splitlines() == [
        "      b-s00000: 20/200 images (10%), 10.0 img/s, ETA 18 s"
    ]
