"""The soak's short version inside a real ComfyUI (CPU): skipped unless COMFYUI_DIR is set.

tests/host/soak.py (run by hand, outside the suite: 20,000 blocks, 200 viewers, 50 reloads) says what a soak
does; here the same soak runs for 500 blocks: an endless stream of the tiny model steered every 5 blocks with
unique texts (each must land), 20 MJPEG viewers in two bursts of 10 (reading a few parts, then closing, resetting
mid-part or stalling), 5 reloads of the page in headless Chromium (none when the host's Python has no selenium or
Chromium is missing), then Cancel and the MP4 decoded to its last frame. The server's bounds, scaled down from the
long soak's: from the baseline at block 100 (taken once the warm-up's burst of viewers and its reload are over) on,
RSS within RSS_MARGIN_MB of the baseline: 500-block runs grew it by 2.5 to 3.6 MB (about 1 MB at some of the
reloads: memory ComfyUI keeps after serving the page, which levels off after a dozen reloads in the long soak),
while an unbounded cache of the steered texts' encodings (128 KiB a text with the stand-in CLIP) grew it by 12.3
MB; at the end, open files within FDS_MARGIN and threads within THREADS_MARGIN of the baseline (both came back to
the baseline exactly in every run; a thread or a connection left behind per viewer, reload or steered text goes
past them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from soak import soak
from test_comfy_frontend import STAND_IN_CLIP
from test_comfy_host import COMFYUI_DIR, started_host

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real host")

BLOCKS, WARM, VIEWERS, RELOADS = 500, 100, 20, 5
RSS_MARGIN_MB, FDS_MARGIN, THREADS_MARGIN = 8, 2, 2


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    yield from started_host(tmp_path_factory, {"stand_in_clip.py": STAND_IN_CLIP})


def has_browser() -> bool:
    python = os.environ.get("COMFYUI_PYTHON") or "python3"
    has = subprocess.run([python, "-c", "import selenium"], capture_output=True, check=False).returncode == 0
    return bool(has and shutil.which("chromium") and shutil.which("chromedriver"))


def test_a_steered_watched_reloaded_endless_stream_stays_within_its_bounds(host):
    summary = soak(host, BLOCKS, VIEWERS, RELOADS if has_browser() else 0, WARM, steer_every=5, concurrency=10,
                   sample_every=25, progress_every=100, rss_margin_mb=RSS_MARGIN_MB, fds_margin=FDS_MARGIN,
                   threads_margin=THREADS_MARGIN, log=lambda line: None)
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}))  # the figures (pytest -s)
    assert summary["ok"], (summary["failures"], {k: v for k, v in summary.items() if k != "samples"},
                           host.log_text()[-2000:])
    assert summary["steer"]["landed"] >= 0.9 * (BLOCKS // 5 - 1) and summary["video"]["decoded_frames"] > 12 * BLOCKS
