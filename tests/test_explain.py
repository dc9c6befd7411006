"""Class-activation maps: the layer rule over several architectures, a map that points at the evidence on
a model that can only have learnt it in one corner, `predict --explain` overlays, the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from guarantees import cli
from PIL import Image

import transferlab
from transferlab.evaluation.explain import TargetLayer, find_target_layer
from transferlab.models.heads import build_classifier
from transferlab.models.registry import resolve_backbone

SIZE = 128  # test_efficientnet's last map is 4x4 here: each quadrant of the image is 2x2 cells of it
CLASSES = {"patch": (230, 30, 30), "plain": None}


def corner_image(path: Path, colour, rng: np.random.Generator) -> Path:
    """Grey noise everywhere and, for a class with a `colour`, a small checkerboard of it in the top-left
    quadrant: the class is decided there alone (edges, which convolutions answer, all inside it)."""
    pixels = np.clip(128 + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255)
    if colour is not None:
        side, square = SIZE // 4, max(2, SIZE // 32)
        checks = (np.add.outer(np.arange(side) // square, np.arange(side) // square) % 2).astype(bool)
        patch = np.where(checks[..., None], np.array(colour, float), 255.0)
        start = SIZE // 16  # clear of the border, which the eval crop trims
        pixels[start:start + side, start:start + side] = patch
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def corner_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for name, colour in CLASSES.items():
            for i in range(n):
                corner_image(root / "data" / split / name / f"{name}{i}.png", colour, rng)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_HOME", str(root / "home"))
        mp.setenv("TRANSFERLAB_OFFLINE", "1")
        run = transferlab.train(root / "data", out=str(root / "run"),
                                **{**TINY, "img_size": SIZE, "strategy": "head-only", "feature_cache": "memory",
                                   "epochs_frozen": 10, "lr_head": 0.5}).run_dir
    return run, root / "data"


# --- which layer --------------------------------------------------------------------------------------

ARCHITECTURES = [  # (backbone, probe size, expected layer, layout): CNNs of three families and a class-token ViT
    ("test_efficientnet", 64, "bn2", "nchw"),
    ("resnet18", 64, "layer4", "nchw"),
    ("tv:resnet18", 64, "layer4", "nchw"),
    ("vit_tiny_patch16_224", 64, "blocks.11.norm1", "tokens"),
]


@pytest.mark.parametrize(("backbone", "size", "layer", "layout"), ARCHITECTURES)
def test_the_layer_is_the_last_spatial_map_the_score_depends_on(backbone, size, layer, layout):
    model = build_classifier(resolve_backbone(backbone, pretrained=False, img_size=size), 3).eval()
    target = find_target_layer(model, size)
    assert (target.name, target.layout) == (layer, layout)
    if layout == "tokens":  # the class token and a 4x4 grid of 16-px patches
        assert (target.grid, target.prefix_tokens) == (4, 1)


def test_a_last_map_of_one_pixel_falls_back_to_the_last_stage_with_a_grid():
    # at 32 px test_efficientnet's head convolution sees 1x1: no "where" in it, so an earlier stage is used
    model = build_classifier(resolve_backbone("test_efficientnet", pretrained=False, img_size=32), 2).eval()
    target = find_target_layer(model, 32)
    assert target.layout == "nchw" and target.grid == 2 and target.name != "bn2"


def test_tokens_are_read_as_a_grid_without_their_class_token():
    import torch

    target = TargetLayer("x", "tokens", 2, prefix_tokens=1)
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (B, 1 + 2x2, C)
    grid = target.to_nchw(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2, :])  # row 0, column 1 is patch 1 (after the class token)


# --- the maps point at the evidence ------------------------------------------------------------------


def corner_share(heatmap: np.ndarray) -> float:
    """The fraction of the map's mass in the top-left quadrant (0.25 for a map that knows nothing)."""
    half = SIZE // 2
    return float(heatmap[:half, :half].sum() / heatmap.sum())


def test_the_map_puts_its_mass_where_the_class_is_decided(corner_run):
    # Measured on this model: 0.66-0.84 of the map's mass on the patch's quadrant, and 0.08-0.38 (mean 0.24)
    # in the same class's maps of images without the patch: the control, no pull of the corner itself.
    run, data = corner_run
    clf = transferlab.load(run)
    patched = sorted((data / "val" / "patch").glob("*.png"))
    explanations = clf.explain(patched)
    assert [e.label for e in explanations] == ["patch"] * len(patched)  # the model learnt the patch
    for e in explanations:
        h = e.heatmap
        assert h.shape == (SIZE, SIZE) and 0.0 <= h.min() and h.max() <= 1.0
        half = SIZE // 2
        quadrants = [h[:half, :half], h[:half, half:], h[half:, :half], h[half:, half:]]
        assert int(np.argmax([q.sum() for q in quadrants])) == 0 and corner_share(h) > 0.5, (e.source, corner_share(h))
    explainer = clf._predictor.explainer()
    plain = [explainer.view(Image.open(p).convert("RGB")) for p in sorted((data / "val" / "plain").glob("*.png"))]
    maps, _ = explainer.heatmaps(plain, [clf.classes.index("patch")] * len(plain))
    control = np.mean([corner_share(h) for h in maps])
    assert np.mean([corner_share(e.heatmap) for e in explanations]) > control + 0.25, control


# --- predict --explain and the API ------------------------------------------------------------------


def test_predict_explain_writes_one_overlay_per_image_named_in_the_json(corner_run, tmp_path):
    run, data = corner_run
    images = sorted((data / "val" / "patch").glob("*.png"))[:2]
    out = tmp_path / "cams"
    p = cli("predict", run, *images, tmp_path / "missing.png", "--json", "--explain", out, "--no-progress")
    assert p.code == 1, p.text  # one input is missing: listed, the others explained
    entries = json.loads(p.out)
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    for entry, image in zip(entries, images):
        overlay = Path(entry["explanation"])
        top = entry["predictions"][0]
        assert overlay in written and overlay.name.startswith(f"{image.stem}.{top['label']}.")
        assert overlay.name.endswith(f".{round(100 * top['probability'])}pct.png")
        with Image.open(overlay) as picture:
            assert picture.size == (224, 224)  # the 128-px view drawn large enough to read
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        assert ((pixels.max(2) - pixels.min(2)) > 80).mean() > 0.2  # the colour map is blended in
    assert "error" in entries[2] and "explanation" not in entries[2]


def test_explain_options_are_checked_before_any_image_is_scored(corner_run, tmp_path, monkeypatch):
    run, data = corner_run
    image = next((data / "val" / "patch").glob("*.png"))
    from transferlab.export import batch

    monkeypatch.setattr(batch, "iter_predictions", lambda *a, **k: pytest.fail("scored before the check"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = cli("predict", run, image, "--explain", blocker, "--no-progress")
    assert p.code == 2 and "is a file" in p.text and "Traceback" not in p.text
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    p = cli("predict", onnx, image, "--explain", tmp_path / "cams", "--no-progress")
    assert p.code == 2 and "run directory" in p.text and "Traceback" not in p.text


def test_classifier_explain_is_typed_and_keeps_input_order(corner_run, tmp_path):
    run, data = corner_run
    clf = transferlab.load(run)
    image = next((data / "val" / "plain").glob("*.png"))
    with Image.open(image) as picture:
        in_memory = np.asarray(picture.convert("RGB"))
    results = clf.explain([image, tmp_path / "nope.png", in_memory], out_dir=tmp_path / "o")
    assert [r.ok for r in results] == [True, False, True]
    first, missing, array = results
    assert first.label in clf.classes and 0 < first.probability <= 1 and first.path.is_file()
    assert first.source == str(image) and isinstance(first.overlay, Image.Image)
    assert "no such file" in missing.error
    assert array.source is None and np.allclose(array.heatmap, first.heatmap, atol=1e-4)
    assert clf.explain(image).label == first.label  # one input: one Explanation
    with pytest.raises(transferlab.TransferlabError, match="method"):
        clf.explain(image, method="nope")
