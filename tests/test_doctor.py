"""The data doctor: on a generated dataset with planted problems (a re-encoded, resized copy of a train image
in val, images moved to the wrong class, a corrupt file, a byte-identical copy, an odd-shaped image) each
one is among the top findings of its kind; its pieces (blockwise pairs, confident learning, the size and
imbalance rules) against plain references; its features come from `train`'s cache; the report shows it."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

import transferlab
from transferlab.errors import TransferlabError

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
# the random-init tiny backbone of the tests: features at 32 px, no download
TINY_FEATURES = {"backbone": "test_efficientnet", "pretrained": False, "img_size": 32, "num_workers": 0}


def make_blocks_image(path: Path, colour, rng: np.random.Generator, size: tuple[int, int] = (40, 40)) -> Path:
    """The class colour with three rectangles of darker or lighter shades of it: the hue says the class (so
    a mislabelled image stands out even to random features), the rectangles make every image its own (so a
    copy is closer to its original than to the rest of its class)."""
    w, h = size
    arr = np.empty((h, w, 3), np.float32)
    arr[:] = colour
    for _ in range(3):
        rw, rh = rng.integers(8, 20, 2)
        x, y = rng.integers(0, w - 8), rng.integers(0, h - 8)
        arr[y:y + rh, x:x + rw] = np.array(colour) * rng.uniform(0.3, 1.3)
    arr += rng.normal(0, 8, arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("doctor") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        for name, colour in COLOURS.items():
            for i in range(n):
                make_blocks_image(root / split / name / f"{name}_{i}.png", colour, rng)
    # a near-duplicate leaking into val: re-encoded as JPEG and resized
    with Image.open(root / "train/red/red_3.png") as im:
        im.resize((36, 36)).save(root / "val/red/copy_of_red_3.jpg", quality=85)
    # images moved to the wrong class
    shutil.move(root / "train/blue/blue_1.png", root / "train/red/was_blue_1.png")
    shutil.move(root / "train/green/green_2.png", root / "train/blue/was_green_2.png")
    # a truncated file
    data = (root / "train/green/green_5.png").read_bytes()
    (root / "train/green/broken.png").write_bytes(data[: len(data) // 2])
    # a byte-identical copy and an image three times as wide as the others
    shutil.copy(root / "train/green/green_3.png", root / "train/green/green_3_again.png")
    make_blocks_image(root / "train/blue/wide.png", COLOURS["blue"], rng, size=(120, 40))
    return root


@pytest.fixture(scope="module")
def diagnosis(planted, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        return transferlab.doctor(planted, similarity=0.98, out=tmp_path_factory.mktemp("out"), progress=False,
                                  **TINY_FEATURES)


def names(findings, n: int | None = None) -> list[str]:
    return [Path(f.path).name for f in findings[:n]]


def test_each_planted_problem_is_among_the_top_findings(diagnosis):
    assert names(diagnosis.of_kind("unreadable")) == ["broken.png"]
    assert "truncated" in diagnosis.of_kind("unreadable")[0].detail

    (near, *rest) = diagnosis.of_kind("near_duplicate")
    assert (Path(near.path).name, Path(near.partner).name) == ("copy_of_red_3.jpg", "red_3.png")
    assert (near.split, near.partner_split) == ("val", "train") and "leakage" in near.detail
    assert near.score > 0.98 and all(f.score <= near.score for f in rest)

    (exact,) = diagnosis.of_kind("exact_duplicate")
    assert {Path(exact.path).name, Path(exact.partner).name} == {"green_3.png", "green_3_again.png"}
    assert "green_3_again.png" not in names(diagnosis.of_kind("near_duplicate"))  # listed once, as exact

    issues = diagnosis.of_kind("label_issue")
    top = {Path(f.path).name: f.suggested_label for f in issues[:3]}
    assert top.get("was_blue_1.png") == "blue" and top.get("was_green_2.png") == "green", issues[:3]

    assert names(diagnosis.of_kind("size_outlier"))[:1] == ["wide.png"]
    assert "aspect" in diagnosis.of_kind("size_outlier")[0].detail
    assert diagnosis.of_kind("class_imbalance") == []  # 3 classes of about the same size


def test_findings_csv_and_json_hold_every_finding(diagnosis):
    with open(diagnosis.files["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["kind", "path", "score", "partner", "suggested_label", "split", "label",
                             "partner_split", "detail"]
    assert len(rows) == len(diagnosis.findings)
    moved = next(r for r in rows if r["path"].endswith("was_blue_1.png"))
    assert moved["kind"] == "label_issue" and moved["suggested_label"] == "blue" and moved["label"] == "red"
    leak = next(r for r in rows if r["kind"] == "near_duplicate")
    assert leak["partner"].endswith("red_3.png") and float(leak["score"]) > 0.98
    from transferlab.evaluation.doctor import load_doctor

    saved = load_doctor(diagnosis.files["json"])
    assert saved["summary"] == diagnosis.summary() and len(saved["findings"]) == len(rows)


def test_a_second_doctor_and_a_trained_run_reuse_the_cached_features(planted, tmp_path, extraction_calls):
    first = transferlab.doctor(planted, out=tmp_path / "d1", progress=False, **TINY_FEATURES)
    assert not first.features_cached and extraction_calls  # nothing cached yet: one pass
    extraction_calls.clear()
    again = transferlab.doctor(planted, out=tmp_path / "d2", progress=False, **TINY_FEATURES)
    assert again.features_cached and extraction_calls == []
    assert again.summary() == first.summary()

    opts = {**TINY, "strategy": "head-only", "epochs_frozen": 1}
    run = transferlab.train(planted, out=str(tmp_path / "run"), **opts).run_dir
    extraction_calls.clear()
    of_run = transferlab.doctor(run, progress=False)  # the run's data with the run's settings: train's cache
    assert of_run.features_cached and extraction_calls == []
    assert of_run.out_dir == run / "doctor" and (run / "doctor" / "findings.csv").is_file()
    assert names(of_run.of_kind("label_issue"), 3) == names(first.of_kind("label_issue"), 3)

    page = transferlab.report(run, progress=False).read_text(encoding="utf-8")
    section = page.split(">Data doctor<", 1)[1].split("<h3>", 1)[0]
    assert "copy_of_red_3.jpg" in section and "was_blue_1.png" in section and "broken.png" in section
    assert section.count('<img src="data:image/png;base64,') == 2  # duplicate pairs, label issues


def test_options_are_checked_before_any_work(planted, tmp_path, extraction_calls):
    with pytest.raises(TransferlabError, match="similarity"):
        transferlab.doctor(planted, similarity=1.5, out=tmp_path / "x", **TINY_FEATURES)
    with pytest.raises(TransferlabError, match="folds"):
        transferlab.doctor(planted, folds=1, out=tmp_path / "x", **TINY_FEATURES)
    with pytest.raises(TransferlabError, match="Unknown training option"):
        transferlab.doctor(planted, out=tmp_path / "x", backbon="test_efficientnet")
    with pytest.raises(TransferlabError, match="does not exist"):
        transferlab.doctor(tmp_path / "nope", out=tmp_path / "x", **TINY_FEATURES)
    assert extraction_calls == [] and not (tmp_path / "x").exists()


def test_cli_prints_the_findings(planted, tmp_path):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    base = [sys.executable, "-m", "transferlab", "doctor", str(planted), "--backbone", "test_efficientnet",
            "--no-pretrained", "--img-size", "32", "--no-progress", "--out", str(tmp_path / "out")]
    p = subprocess.run([*base, "--similarity", "0.98"], capture_output=True, text=True, env=env, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stderr
    assert "Label-issue candidates" in p.stdout and "was_blue_1.png" in p.stdout and "copy_of_red_3.jpg" in p.stdout
    assert f"csv={tmp_path / 'out' / 'findings.csv'}" in p.stdout


def test_cli_rejects_a_bad_option_without_traceback(planted, capsys, monkeypatch):
    from transferlab import cli

    monkeypatch.setattr(sys, "argv", ["transferlab", "doctor", str(planted), "--folds", "1"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--folds" in err and "Traceback" not in err


# --- the pieces, against plain references --------------------------------------------------------------


def test_blockwise_pairs_equal_the_full_similarity_matrix():
    from transferlab.evaluation.neighbours import similar_pairs

    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 6)).astype(np.float32)
    x[17] = x[4] * 3 + 0.01 * rng.normal(size=6)  # a scaled near-copy: cosine, not distance
    x[9] = x[20] + 0.05 * rng.normal(size=6)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = unit @ unit.T
    expected = sorted(((i, j) for i in range(23) for j in range(i + 1, 23) if full[i, j] >= 0.6),
                      key=lambda p: -full[p])
    for block in (3, 5, 64):  # tiles that cut the matrix unevenly, and one tile
        pairs = similar_pairs(x, 0.6, block=block)
        assert [(i, j) for i, j, _ in pairs] == expected
        assert np.allclose([s for *_, s in pairs], [full[p] for p in expected], atol=1e-5)
    assert [(i, j) for i, j, _ in similar_pairs(x, 0.6, block=4, max_pairs=2)] == expected[:2]
    assert expected[:2] == [(4, 17), (9, 20)]


def test_confident_learning_flags_the_confidently_other_images():
    from transferlab.evaluation.label_issues import class_thresholds, find_label_issues

    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3],  # labelled 0
                      [0.2, 0.8], [0.1, 0.9], [0.95, 0.05],  # labelled 1; the last is a 0
                      [0.45, 0.55]])  # labelled 0, leaning to 1 but below t_1: not confident enough
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    t = class_thresholds(probs, labels)
    assert np.allclose(t, [(0.9 + 0.8 + 0.7 + 0.45) / 4, (0.8 + 0.9 + 0.05) / 3])
    issues = find_label_issues(probs, labels)
    # row 5 confidently belongs to class 0 (0.95 >= t_0 = 0.7125); row 6's 0.55 is under t_1 = 0.583
    assert [(i.index, i.suggested) for i in issues] == [(5, 0)]
    assert issues[0].self_confidence == pytest.approx(0.05)


def test_size_and_imbalance_rules():
    from transferlab.data.sources import DataSplits, Sample
    from transferlab.evaluation.doctor import DoctorData, DoctorOptions, _class_imbalance, _size_outliers

    samples = [Sample(Path(f"a{i}.png"), 0) for i in range(20)] + [Sample(Path(f"b{i}.png"), 1) for i in range(3)]
    splits = DataSplits(classes=["a", "b"], train=samples, val=[], test=[], skipped=[], warnings=[], layout="x")
    # one size for almost all: a 10 % larger image is no outlier, a panorama and a thumbnail are
    sizes = [(100, 100)] * 20 + [(110, 110), (400, 100), (20, 20)]
    d = DoctorData(splits=splits, samples=samples, split_of=["train"] * 23, features=np.zeros((23, 2)),
                   sizes=sizes, options=DoctorOptions())
    found = {f.path: f for f in _size_outliers(d)}
    assert set(found) == {"b1.png", "b2.png"}
    assert "aspect" in found["b1.png"].detail and "size" in found["b2.png"].detail
    (minority,) = _class_imbalance(d)
    assert minority.label == "b" and minority.score == pytest.approx(1 - 3 / 20) and "1:7" in minority.detail
