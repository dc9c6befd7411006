"""Recipes end to end on stand-ins for their datasets, written in each dataset's real on-disk layout
(flowers-102/jpg + .mat files, cifar-10-batches-py, stl10_binary, hymenoptera_data), offline, with
--no-pretrained, one epoch per stage and 32 px: the code path a GPU user runs, shrunk."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOURS, make_image_folder
from PIL import Image

from transferlab import api
from transferlab.data.public import prepare_dataset
from transferlab.errors import DataError, TransferlabError
from transferlab.recipes import list_recipes, load_recipe, resolve_recipe

# One stage each, 32 px, tiny batches: every override a GPU user would leave out.
TINY = ["epochs_frozen=1", "epochs_finetune=1", "img_size=32", "batch_size=4", "num_workers=0", "report=false"]
PALETTE = list(COLOURS.values()) + [(200, 200, 40)]


def cli(*args):
    env = {**os.environ, "TRANSFERLAB_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "transferlab", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def _pixels(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array(PALETTE[label % len(PALETTE)], dtype=np.float32)
    return np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)


def make_flowers(root: Path, classes: int = 3, per_split=(4, 2, 2)) -> Path:
    """flowers-102/jpg/image_00001.jpg..., imagelabels.mat, setid.mat as Oxford ships them (labels 1-based;
    setid holds trnid/valid/tstid image ids); per_split = images per class in tstid, trnid, valid."""
    from scipy.io import savemat

    base = root / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels, ids = [], {"tstid": [], "trnid": [], "valid": []}
    for label in range(classes):
        for key, n in zip(("tstid", "trnid", "valid"), per_split):
            for _ in range(n):
                labels.append(label + 1)
                ids[key].append(len(labels))
                Image.fromarray(_pixels(label, rng, 40)).save(base / "jpg" / f"image_{len(labels):05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


def make_cifar(root: Path, per_batch: int = 6, names=("airplane", "automobile", "bird")) -> Path:
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}: pickled dicts, uint8 rows of
    3x32x32 channel-planar pixels, as the official archive holds them."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % len(names) for i in range(per_batch)]
        data = np.stack([_pixels(lbl, rng, 32).transpose(2, 0, 1).reshape(-1) for lbl in labels])
        batch = {"batch_label": name, "labels": labels, "data": data,
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": list(names), "num_vis": 3072}
    (base / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def make_stl(root: Path, train: int = 8, test: int = 6, names=("airplane", "bird")) -> Path:
    """stl10_binary/{train,test}_{X,y}.bin + class_names.txt: uint8 images stored column-major per
    channel (N x 3 x 96 x 96, W before H) and labels 1..10, as the official archive holds them."""
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", train), ("test", test)):
        labels = np.array([i % len(names) for i in range(n)], dtype=np.uint8)
        images = np.stack([_pixels(int(lbl), rng, 96) for lbl in labels])  # N x H x W x 3
        images.transpose(0, 3, 2, 1).tofile(base / f"{split}_X.bin")  # N x 3 x W x H
        (labels + 1).tofile(base / f"{split}_y.bin")
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    return root


def run_recipe(name: str, root: Path, out: Path, *extra: str):
    return api.recipe_run(name, data_root=root, out=out, progress=False,
                          overrides=[*TINY, "pretrained=false", *extra])


# ------------------------------------------------------------------------------------------ catalogue


def test_the_classic_recipes_ship_as_yaml_and_resolve():
    names = {r.name for r in list_recipes()}
    assert {"flowers102-vgg16", "flowers102-resnet50", "flowers102-resnet152", "cifar10-resnet18-mlp",
            "stl10-vgg16", "retraining-benchmark"} <= names
    for name in names:
        recipe = resolve_recipe(name)
        assert recipe.dataset["name"] and recipe.source.get("title")


def test_retraining_benchmark_spans_every_torchvision_classifier():
    import torchvision

    recipe = load_recipe("retraining-benchmark")
    expected = [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    assert recipe.backbones() == expected and len(expected) > 50
    assert recipe.strategies() == ["head-only", "full", "scratch"]
    assert resolve_recipe(recipe, ["backbones=tv:alexnet,tv:vgg13"]).backbones() == ["tv:alexnet", "tv:vgg13"]


@pytest.mark.parametrize("override, message", [
    ("epochs_finetun=1", "not a TrainConfig field"),
    ("lr_decay=steep", "lr decay"),
    ("backbones=tv:alexnet", "compare recipes"),
    ("epochs_finetune", "key=value"),
    ("preprocess.size=7", "preprocess keys"),
])
def test_overrides_that_do_not_apply_are_clear_errors(override, message):
    with pytest.raises(TransferlabError, match=message):
        resolve_recipe("flowers102-resnet50", [override])


def test_flowers_lrs_on_the_real_resnet50_and_vgg16_layers():
    """The published per-layer LRs on the real architectures (built on the meta device: no memory, no
    weights): ResNet-50 layer4 1e-4, ÷3 per stage, the stem (given no LR) 1e-8; VGG-16 linear from 1e-4 at
    its top layer down to 1e-7 at its first conv."""
    import torch
    import torchvision

    from transferlab.config import TrainConfig
    from transferlab.models.heads import replace_head
    from transferlab.models.param_groups import discriminative_param_groups

    for name, arch in (("flowers102-resnet50", torchvision.models.resnet50),
                       ("flowers102-vgg16", torchvision.models.vgg16)):
        cfg = TrainConfig(data="x", **resolve_recipe(name).config)
        with torch.device("meta"):
            model = arch()
        replace_head(model, 102)
        groups = discriminative_param_groups(model, cfg.lr_finetune, cfg.lr_decay, last_k=cfg.unfreeze,
                                             floor_lr=cfg.lr_floor)
        lrs = {g["name"]: g["lr"] for g in groups}
        covered = sum(p.numel() for g in groups for p in g["params"])
        assert covered == sum(p.numel() for p in model.parameters())  # every parameter has an LR
        if name.endswith("resnet50"):
            assert lrs == pytest.approx({"head": 1e-4, "layer4": 1e-4, "layer3": 1e-4 / 3, "layer2": 1e-4 / 9,
                                         "layer1": 1e-4 / 27, "stem": 1e-8})
        else:
            body = [g["lr"] for g in groups if g["name"] != "head"]  # top block first
            assert len(body) == 15  # 13 convs + fc6 + fc7
            assert body[0] == pytest.approx(1e-4) and body[-1] == pytest.approx(1e-7)
            assert all(a > b for a, b in itertools.pairwise(body))


def test_head_stage_uses_the_configured_optimizer_and_a_constant_lr():
    """Feature extraction follows the recipe (Adam / SGD at a constant LR), not always AdamW + cosine."""
    import torch

    from transferlab.training.head_stage import train_head

    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    heads = {}
    for name in ("adamw", "sgd"):
        torch.manual_seed(0)
        head = torch.nn.Linear(8, 3)
        records, _ = train_head(head, x, y, x, y, epochs=3, lr=0.05, batch_size=8, optimizer=name, constant_lr=True)
        assert [r["lr"] for r in records] == [0.05] * 3
        heads[name] = head.weight.detach().clone()
    assert not torch.allclose(heads["adamw"], heads["sgd"])
    records, _ = train_head(torch.nn.Linear(8, 3), x, y, x, y, epochs=3, lr=0.05, batch_size=8)
    assert records[-1]["lr"] < 0.05  # the default stays cosine-decayed


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def flowers_root(tmp_path_factory) -> Path:
    return make_flowers(tmp_path_factory.mktemp("flowers"))


# VGG-16 (138 M parameters) and ResNet-152 are too heavy for a CPU test: their recipes run here on a small
# stand-in backbone; ResNet-50's on ResNet-18, which keeps the ResNet stage structure its exp:3 / unfreeze 4 /
# 1e-8 rule is about. The real architectures' LR layout is pinned above, and cifar10-resnet18-mlp runs on its
# real architecture.
FLOWERS_BACKBONE = {"flowers102-resnet50": "tv:resnet18", "flowers102-resnet152": "test_efficientnet",
                    "flowers102-vgg16": "test_efficientnet"}
_flowers_runs: dict[str, object] = {}


def flowers_run(name: str, root: Path, tmp_path_factory):
    """One run per recipe for the module (the report test reuses one)."""
    if name not in _flowers_runs:
        out = tmp_path_factory.mktemp("run") / name
        _flowers_runs[name] = run_recipe(name, root, out, f"backbone={FLOWERS_BACKBONE[name]}")
    return _flowers_runs[name]


@pytest.mark.parametrize("name", sorted(FLOWERS_BACKBONE))
def test_flowers_recipe_runs_on_the_official_layout(name, flowers_root, tmp_path_factory):
    result = flowers_run(name, flowers_root, tmp_path_factory)
    run = result.out_dir
    data = json.loads((run / "data.json").read_text())
    # trained on the 'test' split (tstid: 4 per class), validated on trnid + valid (2 + 2 per class)
    assert (data["num_train"], data["num_val"]) == (12, 12)
    import torchvision

    assert data["classes"] == sorted(torchvision.datasets.Flowers102.classes[:3])
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["frozen", "finetune"]
    config = (run / "config.yaml").read_text()
    assert "optimizer: adam" in config and "augment: classic" in config and "lr_floor: 1.0e-08" in config
    if name == "flowers102-resnet50":  # lr: the top group's, constant (the stem's 1e-8 floor: test above)
        assert float(rows[2].split(",")[6]) == pytest.approx(1e-4)
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["name"] == name and [f["metric"] for f in recipe["published"]] == ["feature_extraction", "finetune"]
    assert [r["published"] for r in result.versus] == ["91.0–94.0 %", "> 96.0 %"]
    assert all(r["this_run"] is not None for r in result.versus)


def test_report_shows_the_run_beside_the_published_figures(flowers_root, tmp_path_factory):
    result = flowers_run("flowers102-vgg16", flowers_root, tmp_path_factory)
    page = api.report(result.out_dir, progress=False).read_text()
    section = page[page.index("Versus published"):page.index("Configuration")]
    assert "91.0–94.0 %" in section and "&gt; 96.0 %" in section
    for row in result.versus:
        assert f"{100 * row['this_run']:.1f} %" in section
    assert "outside" in section or "within" in section


def test_cifar10_recipe_trains_its_real_resnet18_with_the_mlp_head(tmp_path):
    root = make_cifar(tmp_path / "data", per_batch=3)
    result = run_recipe("cifar10-resnet18-mlp", root, tmp_path / "run")
    meta = json.loads((result.out_dir / "model.json").read_text())
    assert meta["backbone"]["name"] == "tv:resnet18"
    assert meta["head"] == {"kind": "mlp", "hidden": 256, "dropout": 0.0}  # Linear(512,256)-ReLU-Linear(256,N)
    assert meta["preprocessing"]["crop_mode"] == "squash"
    from transferlab.io import load_tensors

    shapes = {k: tuple(v.shape) for k, v in load_tensors(result.out_dir / "model.safetensors").items()
              if k.startswith("fc.head")}
    assert sorted(shapes.values()) == [(3,), (3, 256), (256,), (256, 512)]
    data = json.loads((result.out_dir / "data.json").read_text())
    assert (data["num_train"], data["num_val"]) == (15, 3)  # 5 data batches / the test batch
    assert data["classes"] == ["airplane", "automobile", "bird"]  # from batches.meta
    # the PNG copy is made once: a second preparation reuses it
    csv_path = result.data
    stamp = csv_path.stat().st_mtime_ns
    assert prepare_dataset("CIFAR10", root, {"train": ["train"], "val": ["test"]}) == csv_path
    assert csv_path.stat().st_mtime_ns == stamp


def test_cifar_batches_are_read_without_running_pickled_code(tmp_path):
    root = make_cifar(tmp_path / "data")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(DataError, match="refusing to load"):
        prepare_dataset("CIFAR10", root, {"train": ["train"], "val": ["test"]})


def test_stl10_recipe_uses_its_pad_crop_and_normalisation(tmp_path):
    root = make_stl(tmp_path / "data")
    # VGG-16 is too heavy for a CPU test: a small stand-in backbone runs the recipe's settings
    result = run_recipe("stl10-vgg16", root, tmp_path / "run", "backbone=test_efficientnet")
    meta = json.loads((result.out_dir / "model.json").read_text())
    assert meta["preprocessing"]["mean"] == [0.4467, 0.4398, 0.4066]
    assert meta["preprocessing"]["std"] == [0.2603, 0.2566, 0.2713]
    config = (result.out_dir / "config.yaml").read_text()
    assert "augment: padcrop" in config and "strategy: full" in config
    data = json.loads((result.out_dir / "data.json").read_text())
    assert (data["num_train"], data["num_val"]) == (8, 6)
    # the PNGs hold the images the right way up (STL stores them column-major)
    rng = np.random.default_rng(2)
    first = _pixels(0, rng, 96)
    written = np.asarray(Image.open(result.data.parent / "stl10" / "train" / "00000.png"))
    assert np.array_equal(written, first)


def test_retraining_benchmark_runs_shallow_deep_and_scratch_through_compare(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "hymenoptera_data", per_class=(6, 3))
    result = run_recipe("retraining-benchmark", root, tmp_path / "cmp", "backbones=tv:squeezenet1_1")
    assert [(r["backbone"], r["strategy"]) for r in result.result.rows] == [
        ("tv:squeezenet1_1", s) for s in ("head-only", "full", "scratch")]
    assert all(r["latency_ms_b1"] > 0 and r["train_seconds"] > 0 for r in result.result.rows)
    assert [r["published"] for r in result.versus] == ["93.5 %", "81.0 %", "45.8 %"]
    cell = json.loads((tmp_path / "cmp" / "tv-squeezenet1_1__full" / "recipe.json").read_text())
    assert cell["published"] == [{"backbone": "tv:squeezenet1_1", "strategy": "full", "metric": "best",
                                  "value": 0.8105}]
    for run in result.result.rows:  # the same SGD settings in every cell
        config = (Path(run["run_dir"]) / "config.yaml").read_text()
        assert "optimizer: sgd" in config and "lr_head: 0.001" in config


# --------------------------------------------------------------------------------------- CLI, offline


def test_offline_recipe_run_fails_fast_saying_what_to_download_and_where(tmp_path):
    root = tmp_path / "empty"
    p = cli("recipe", "run", "flowers102-resnet50", "--data-root", root, "--out", tmp_path / "run")
    assert p.returncode == 2, p.stderr
    err = " ".join(p.stderr.split())  # unwrap the console's line breaks
    assert "Traceback" not in p.stderr
    for needed in ("102flowers.tgz", "imagelabels.mat", "setid.mat", "flowers-102/jpg"):
        assert needed in err
    assert "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/" in err
    assert "TRANSFERLAB_OFFLINE" in err and "tv:resnet50" in err  # the weights cannot be had either
    assert not (tmp_path / "run").exists()


def test_offline_message_lists_only_the_files_still_missing(tmp_path):
    from transferlab.data.public import ensure_dataset

    root = make_flowers(tmp_path / "data")
    (root / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(DataError) as info:
        ensure_dataset("Flowers102", root)
    missing = str(info.value).split("Missing:")[1].split("\n")[0]
    assert "setid.mat" in missing and "imagelabels.mat" not in missing


def test_recipe_show_prints_the_resolved_config_and_the_source_figures():
    p = cli("recipe", "show", "flowers102-vgg16", "--override", "epochs_finetune=3", "--override", "lr_finetune=2e-4")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "epochs_finetune: 3" in out and "lr_finetune: 0.0002" in out and "backbone: tv:vgg16" in out
    assert "lr_decay: linear:1.0e-7" in out and "lr_floor: 1.0e-08" in out
    assert "train = test, val = train+val" in out
    assert "91.0–94.0 %" in out and "> 96.0 %" in out
    p = cli("recipe", "show", "flowers102-resnet5")
    assert p.returncode == 2 and "flowers102-resnet50" in p.stderr  # did you mean
