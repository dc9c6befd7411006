"""The HTML report: self-contained (inline PNGs, no URLs, no scripts), user strings escaped, several runs
compared, and a real browser (headless Chromium) loading it with every image decoded."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, make_image
from PIL import Image

import transferlab
from transferlab.errors import RunDirError

# Class folder names a user can really have, and that break a page if not escaped.
CLASSES = {"a&b": (200, 40, 40), "<b>blue": (40, 60, 200)}
IMG_SRC = re.compile(r'<img\b[^>]*\bsrc="([^"]*)"')
CAM_SRC = re.compile(r'<img\b[^>]*\bsrc="([^"]*)" alt="class-activation map of ')
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the same data (linear and MLP heads); neither is evaluated yet."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 5)):
        for name, colour in CLASSES.items():
            for i in range(n):
                make_image(root / "data" / split / name / f"{i}.png", colour, rng)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        opts = {**TINY, "strategy": "head-only", "feature_cache": "memory"}
        linear = transferlab.train(root / "data", out=str(root / "run-linear"), **opts).run_dir
        mlp = transferlab.train(root / "data", out=str(root / "run-mlp"), head="mlp", head_hidden=8, **opts).run_dir
    return linear, mlp


@pytest.fixture(scope="module")
def single_report(runs) -> Path:
    return transferlab.report(runs[0], progress=False)


def decode_png(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)))
    image.load()
    assert image.format == "PNG"
    return image


def test_single_run_report_is_written_in_the_run_after_evaluating_it(runs, single_report):
    assert single_report == runs[0] / "report.html"
    assert (runs[0] / "eval-val.json").is_file()  # the report evaluated the run first
    page = single_report.read_text(encoding="utf-8")
    for section in ("Configuration", "Data", "Data doctor", "Training curves", "Evaluation: val", "Per class", "Most confused",
                    "Confusion matrix", "Calibration", "Top losses", "Timing", "Environment"):
        assert f">{section}<" in page, section
    assert "expected calibration error" in page and "feature extraction" in page
    # these runs kept their features in memory: the report makes no second forward pass for the doctor
    assert "did not cache frozen features" in page.split(">Data doctor<", 1)[1]


def doctor_pictures(run: Path) -> int:
    """The data doctor's pictures in a run's report: duplicate pairs and label issues, each when found."""
    return len(list((run / "doctor").glob("*.png")))


def cam_overlays(run: Path) -> int:
    """Class-activation maps a run's report shows: its val evaluation's errors (at most 8) and correct sample."""
    interp = json.loads((run / "eval-val.json").read_text(encoding="utf-8"))["interpretation"]
    return min(8, sum(r["true"] != r["predicted"] for r in interp["top_losses"])) + len(interp["correct_sample"])


def calibration_pictures(run: Path) -> int:
    """Risk-coverage, and the reliability diagram before temperature scaling when T is not 1."""
    return 1 + (json.loads((run / "model.json").read_text())["calibration"]["temperature"] != 1.0)


def test_report_is_self_contained(runs, single_report):
    page = single_report.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert 'src="file:' not in page and "<script" not in page.lower() and "<link" not in page.lower()
    sources = IMG_SRC.findall(page)
    # curves, confusion matrix, reliability diagram, per-class accuracy, top losses; the doctor's and
    # calibration's pictures; the class-activation maps
    assert cam_overlays(runs[0]) > 0 and len(CAM_SRC.findall(page)) == cam_overlays(runs[0])
    expected = 5 + doctor_pictures(runs[0]) + calibration_pictures(runs[0]) + cam_overlays(runs[0])
    assert len(sources) == expected == page.count("<img")
    sizes = [decode_png(src).size for src in sources]
    assert all(w > 100 and h > 100 for w, h in sizes)


def test_class_names_are_html_escaped(single_report):
    page = single_report.read_text(encoding="utf-8")
    assert "a&amp;b" in page and "&lt;b&gt;blue" in page
    assert "<b>blue" not in page and "a&b" not in page


def test_several_runs_get_a_comparison_table_in_the_working_directory(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = transferlab.report(list(runs), progress=False)
    assert path.resolve() == (tmp_path / "report.html").resolve()
    page = path.read_text(encoding="utf-8")
    comparison = page.split("<h2>Comparison</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", comparison.split("<tbody>", 1)[1])
    assert len(rows) == 2
    assert "run-linear" in rows[0] and "run-mlp" in rows[1]
    assert all("test_efficientnet" in r and "head-only" in r for r in rows)
    for i, name in enumerate(("run-linear", "run-mlp")):
        assert f'<h2 id="run-{i}">{name}</h2>' in page
    assert page.count("Evaluation: val") == 2


def test_a_missing_run_fails_before_any_work(runs, tmp_path):
    out = tmp_path / "never.html"
    with pytest.raises(RunDirError, match="gone"):
        transferlab.report([runs[0], tmp_path / "gone"], out, progress=False)
    assert not out.exists()


def test_report_command_writes_the_file(runs, tmp_path):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "COLUMNS": "200"}
    out = tmp_path / "cli.html"
    p = subprocess.run([sys.executable, "-m", "transferlab", "report", str(runs[0]), "-o", str(out), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    assert f"report={out}" in p.stdout and out.stat().st_size > 10_000


# --- a real browser ---------------------------------------------------------------------------------


def chromium() -> str:
    found = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if found is None:
        pytest.skip("chromium not installed: apt-get install chromium (or .ci/install-chromium)")
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


# Added to a copy of the page only (the report itself has no script): after load, count the images the
# browser actually decoded (complete, with a natural width) and put the count in the title.
IMAGE_PROBE = ('<script>window.addEventListener("load",function(){var im=document.images,ok=0;'
               "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}"
               'document.title="images-decoded:"+ok+"/"+im.length;});</script>')


def test_chromium_renders_the_report_with_every_image(runs, single_report, tmp_path):
    binary = chromium()
    shot = tmp_path / "shot.png"
    # tall enough for the whole page: every plot is painted into the screenshot
    p = run_chromium(binary, tmp_path / "profile-1", f"--screenshot={shot}", "--window-size=1280,6000",
                     single_report.resolve().as_uri())
    assert shot.is_file(), p.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 6000)
        pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    # a blank or failed page is one flat colour
    assert pixels.std() > 20
    # text and tables are grey; the plots are colour (measured: ~730k saturated pixels with the
    # plots, ~4k without them: the heading rules)
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
    assert saturated.sum() > 100_000

    page = single_report.read_text(encoding="utf-8")
    expected = len(IMG_SRC.findall(page))
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", IMAGE_PROBE + "</body>"), encoding="utf-8")
    p = run_chromium(binary, tmp_path / "profile-2", "--dump-dom", probe.as_uri())
    title = re.search(r"<title>(.*?)</title>", p.stdout)
    assert title is not None, p.stderr[-2000:]
    assert title.group(1) == f"images-decoded:{expected}/{expected}"
    assert expected == 5 + doctor_pictures(runs[0]) + calibration_pictures(runs[0]) + cam_overlays(runs[0])


def test_chromium_paints_every_class_activation_map(runs, single_report, tmp_path):
    """Each overlay of the report, laid out at a known place on a page of its own, is on the screen as its
    PNG holds it: decoded and painted, not a broken-image box."""
    binary = chromium()
    sources = CAM_SRC.findall(single_report.read_text(encoding="utf-8"))
    overlays = [np.asarray(decode_png(src).convert("RGB")).astype(np.int16) for src in sources]
    assert overlays
    step, per_row = 200, 6
    tags = "".join(f'<img src="{src}" style="position:absolute;left:{step * (i % per_row)}px;'
                   f'top:{step * (i // per_row)}px;margin:0;border:0">' for i, src in enumerate(sources))
    page = tmp_path / "cams.html"
    page.write_text(f"<!DOCTYPE html><html><body style=margin:0>{tags}</body></html>", encoding="utf-8")
    shot = tmp_path / "cams.png"
    p = run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}", "--force-device-scale-factor=1",
                     f"--window-size={step * per_row},{step * (len(sources) // per_row + 1)}", page.as_uri())
    assert shot.is_file(), p.stderr[-2000:]
    with Image.open(shot) as image:
        screen = np.asarray(image.convert("RGB")).astype(np.int16)
    for i, overlay in enumerate(overlays):
        top, left = step * (i // per_row), step * (i % per_row)
        painted = screen[top:top + overlay.shape[0], left:left + overlay.shape[1]]
        assert np.abs(painted - overlay).mean() < 4, f"overlay {i} is not painted as decoded"


def test_the_report_shows_the_maps_of_the_worst_errors_beside_correct_ones(runs, single_report, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    saved = json.loads((run / "eval-val.json").read_text(encoding="utf-8"))
    error = saved["interpretation"]["top_losses"][0]
    error["true"] = next(c for c in CLASSES if c != error["predicted"])  # as if the model got it wrong
    (run / "eval-val.json").write_text(json.dumps(saved), encoding="utf-8")
    page = transferlab.report(run, tmp_path / "r.html", progress=False).read_text(encoding="utf-8")
    cams = page.split(">Class-activation maps<", 1)[1]
    errors, correct = cams.split(">Worst errors<", 1)[1].split(">Correct predictions, least to most confident<", 1)
    assert len(CAM_SRC.findall(errors)) == 1 and len(CAM_SRC.findall(correct)) == cam_overlays(runs[0])
    assert f"{html.escape(error['true'])} → {html.escape(error['predicted'])}" in errors


def test_the_report_opens_with_results_and_keeps_the_settings_for_last(single_report):
    page = single_report.read_text(encoding="utf-8")
    order = [page.index(marker) for marker in ("best val accuracy", "<h3>Training curves</h3>", "Evaluation: val",
                                               "<h3>Data</h3>", "<h3>Timing</h3>", "<h3>Configuration</h3>")]
    assert order == sorted(order)
