"""The backbone catalog behind `transferlab models`: filters, published metadata, measured-and-cached values."""

from __future__ import annotations

import fnmatch
import json

import pytest
import timm
import torchvision
from typer.testing import CliRunner

from transferlab import TransferlabError
from transferlab.cli import app
from transferlab.models.catalog import list_catalog, measure_backbone, meta_cache_path, parse_count
from transferlab.models.registry import resolve_backbone

LITE = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}


def _refuse_to_build(monkeypatch):
    """Make every model builder fail: what passes afterwards was obtained without instantiating."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was built")

    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(torchvision.models, "get_model", refuse)
    return calls


@pytest.mark.parametrize("text, expected", [("30M", 30e6), ("5e6", 5e6), ("500k", 5e5), ("1.5B", 1.5e9),
                                            ("2_000", 2000.0), (1234, 1234.0)])
def test_counts_accept_suffixes_and_scientific_notation(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["3x", "M", "-5M", ""])
def test_unreadable_counts_are_a_clear_error(text):
    with pytest.raises(TransferlabError, match="30M"):
        parse_count(text)


@pytest.mark.parametrize("option, field, limit", [("max_params", "params", "400k"), ("max_gflops", "gflops", 0.05)])
def test_size_filters_keep_exactly_the_rows_within_the_limit(option, field, limit):
    everything = list_catalog("test_")
    assert everything and all(r[field] is not None for r in everything)  # few rows: all measured
    numeric = parse_count(limit)
    expected = {r["name"] for r in everything if r[field] <= numeric}
    kept = {r["name"] for r in list_catalog("test_", **{option: limit})}
    assert kept == expected
    assert 0 < len(kept) < len(everything)  # the limit really cuts


def test_search_is_a_substring_or_a_glob():
    assert {r["name"] for r in list_catalog("test_res")} == {"test_resnet.r160_in1k"}
    globbed = [r["name"] for r in list_catalog("test_*net.*", measure_limit=0)]
    assert globbed and all(fnmatch.fnmatch(n, "test_*net.*") for n in globbed)
    assert "test_vit.r160_in1k" not in globbed


def test_shipped_lite_models_are_usable_offline_and_hub_models_are_not():
    offline = list_catalog("efficientnet_lite", offline_only=True, measure_limit=0)
    assert LITE <= {r["name"] for r in offline}
    assert all(r["offline"] for r in offline)
    lite0 = next(r for r in offline if r["name"] == "efficientnet_lite0")
    assert lite0["source"] == "offline" and lite0["input_size"] == 224
    hub = list_catalog("test_resnet", measure_limit=0)  # tests run with TRANSFERLAB_OFFLINE=1, empty caches
    assert [r["offline"] for r in hub] == [False]


def test_torchvision_metadata_is_published_not_measured(monkeypatch):
    calls = _refuse_to_build(monkeypatch)
    rows = {r["name"]: r for r in list_catalog("tv:resnet50", measure_limit=0)}
    default = rows["tv:resnet50"]
    assert default["params"] == 25_557_032
    assert default["top1"] == pytest.approx(80.858)
    assert default["gflops"] == pytest.approx(4.089, abs=1e-3)
    assert default["input_size"] == 224 and default["metadata"] == "torchvision"
    assert rows["tv:resnet50:IMAGENET1K_V1"]["top1"] == pytest.approx(76.13)
    assert calls == []


def test_a_model_that_cannot_be_measured_keeps_its_published_numbers(monkeypatch):
    _refuse_to_build(monkeypatch)
    row = next(r for r in list_catalog("tv:resnet50") if r["name"] == "tv:resnet50")
    assert row["params"] == 25_557_032 and row["feature_dim"] is None


def test_measured_values_are_cached_and_reused_without_building(monkeypatch):
    first = list_catalog("test_resnet")
    assert first[0]["params"] == 469_688 and first[0]["feature_dim"] == 96 and first[0]["metadata"] == "measured"
    entries = json.loads(meta_cache_path().read_text())["entries"]
    assert any(key.startswith("timm:test_resnet@160") for key in entries)
    calls = _refuse_to_build(monkeypatch)
    assert list_catalog("test_resnet") == first
    assert calls == []


def test_gflops_count_multiply_adds_like_torchvision():
    measured = measure_backbone(resolve_backbone("tv:resnet50", pretrained=False))
    assert measured["params"] == 25_557_032
    assert measured["gflops"] == pytest.approx(4.089, rel=0.005)  # torchvision's published _ops
    assert measured["head"] == "fc" and measured["feature_dim"] == 2048


def test_models_command_prints_the_new_columns_as_json():
    result = CliRunner().invoke(app, ["models", "--search", "test_resnet", "--max-params", "1M", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["test_resnet.r160_in1k"]
    assert {"params", "gflops", "input_size", "head", "feature_dim", "top1", "offline"} <= set(rows[0])


def test_models_offline_shows_the_published_top1_of_the_shipped_lites(monkeypatch):
    """The three backbones usable offline carry timm's published ImageNet top-1, without building a model."""
    _refuse_to_build(monkeypatch)
    published = {"efficientnet_lite0": 74.83, "efficientnet_lite1": 76.644, "efficientnet_lite2": 77.464}
    rows = {r["name"]: r for r in list_catalog("efficientnet_lite", offline_only=True, measure_limit=0)}
    assert {name: rows[name]["top1"] for name in published} == pytest.approx(published)
    table = CliRunner().invoke(app, ["models", "--offline", "--search", "efficientnet_lite"], env={"COLUMNS": "120"})
    assert table.exit_code == 0, table.output
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if "efficientnet_lite" in line}
    assert all(f"{top1:.2f}" in lines[name] for name, top1 in published.items())
