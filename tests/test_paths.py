"""One owner per file-name rule (transferlab.paths): the slug every name transferlab makes goes through,
the hidden-file rule every file lister applies, and the home folder every cache lives under."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import make_image_folder

from transferlab.data.digits import default_datasets_root
from transferlab.data.sources import load_splits
from transferlab.evaluation.explain import overlay_file_name
from transferlab.evaluation.predict import expand_inputs
from transferlab.models.catalog import meta_cache_path
from transferlab.paths import home, is_hidden, slug
from transferlab.run_dir import RunDir
from transferlab.training.feature_cache import default_cache_dir
from transferlab.workflows.compare import cell_dir

SRC = Path(__file__).resolve().parents[1] / "src" / "transferlab"


def test_slug_keeps_letters_and_never_hides_the_name():
    assert slug("hf-hub:timm/resnet18.a1_in1k") == "hf-hub-timm-resnet18.a1_in1k"
    assert slug("café au lait") == "café-au-lait"
    assert slug(".hidden label") == "hidden-label"
    assert slug("///") == "" and slug("///", "data") == "data"


def test_every_made_name_goes_through_the_one_slug(tmp_path):
    assert RunDir.default("hf-hub:timm/x").path.name.endswith("-hf-hub-timm-x")
    assert cell_dir(tmp_path, "hf-hub:timm/x", "boundary").name == "hf-hub-timm-x__boundary"
    assert overlay_file_name("/a/.my photo.jpg", "café au lait", 0.5, set()) == "my-photo.café-au-lait.50pct.png"


def test_hidden_means_a_dot_file_or_a_macos_metadata_folder():
    assert all(is_hidden(n) for n in (".DS_Store", "._cat.jpg", "__MACOSX", Path("data/.cache")))
    assert not any(is_hidden(n) for n in ("cat.jpg", "MACOSX", Path(".hidden/cat.jpg")))


def test_predict_lists_a_folder_as_the_data_loader_does(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=(2,), splits=("all",)) / "all"
    visible = sorted((data / "red").iterdir())
    for junk in (data / "red" / "._fork.png", data / "__MACOSX" / "red" / "x.png", data / ".thumbs" / "y.png"):
        junk.parent.mkdir(parents=True, exist_ok=True)
        junk.write_bytes(visible[0].read_bytes())
    listed = [path for path, error in expand_inputs([data / "red"]) if error is None]
    assert listed == visible
    loaded = load_splits(data, val_split=0.5, progress=False)
    assert {s.path for s in loaded.train + loaded.val} == {p for p, _ in expand_inputs([data])}


def test_a_resource_fork_beside_a_shard_is_not_read_as_one(tmp_path):
    import transferlab

    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=(5,), splits=("all",)) / "all"
    shards = tmp_path / "shards"
    transferlab.api.shards(data, shards, shard_size=4, progress=False)
    clean = load_splits(shards, progress=False).counts()
    for tar in list(shards.rglob("*.tar")):
        (tar.parent / f"._{tar.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble" * 8)
    assert load_splits(shards, progress=False).counts() == clean


def test_caches_and_datasets_live_under_one_home(monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_HOME", "~/tl-home")
    root = Path("~/tl-home").expanduser()
    assert home() == root
    assert default_cache_dir() == root / "features"
    assert default_datasets_root() == root / "datasets"
    assert meta_cache_path() == root / "model_meta.json"


def test_no_module_but_paths_spells_these_rules():
    spellings = re.compile(r'__MACOSX|startswith\("\."\)|\[\^A-Za-z0-9|\[\^\\w|TRANSFERLAB_HOME"\)')
    offenders = [f"{p.relative_to(SRC)}:{n}" for p in SRC.rglob("*.py") if p.name != "paths.py"
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if spellings.search(line)]
    assert not offenders, offenders
