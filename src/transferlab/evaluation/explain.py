"""Class-activation maps: where in an image the model found the evidence for the class it predicts.

The maps are Grad-CAM (Selvaraju et al. 2017), computed by ``torchcam`` (Apache-2.0, no dependency
beyond torch, numpy, Pillow and matplotlib). Grad-CAM rather than a sibling: it costs one backward
pass to the last feature stage, and it is the CAM that passes the model- and data-randomisation
sanity checks of Adebayo et al. 2018; Grad-CAM++ and LayerCAM differ from it mainly on maps of
earlier, finer layers, which transferlab does not use (on the corner-patch model of tests/test_explain.py,
after 3 head epochs, the three put 0.70, 0.74 and 0.71 of the map's mass on the patch's quadrant).
``method`` picks another.

The layer is chosen for any architecture by one rule (:func:`find_target_layer`): of the modules whose
output is a spatial map of the input, the last one the predicted score depends on, preferring maps with
as many channels as the head reads. A spatial map is a square grid (the probe image is square) laid
out NCHW (CNNs), NHWC (Swin-like) or as tokens (ViTs: up to 16 class/register tokens, then the grid);
"depends on" is checked with one probe backward pass, which is how a class-token ViT gets the last
block's input norm rather than its final norm (whose patch tokens the class token never reads), and
the channel preference passes over its attention's q/k/v projections.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchcam.methods import GradCAM, GradCAMpp, LayerCAM
from torchcam.utils import overlay_mask

from transferlab.data.images import ImageError, load_image
from transferlab.data.transforms import Preprocessing, eval_view
from transferlab.errors import TransferlabError
from transferlab.evaluation.predict import load_inference_model
from transferlab.models.heads import HeadNotFound, head_slot
from transferlab.paths import slug

__all__ = ["EXTRACTORS", "CamExplainer", "ExplainError", "TargetLayer", "check_method", "explain_entries",
           "explain_evaluation", "find_target_layer", "overlay_file_name", "overlay_folder", "render_overlay"]

log = logging.getLogger("transferlab")

MAX_PREFIX_TOKENS = 16  # class, distillation and register tokens before a ViT's patch grid
OVERLAY_MIN_SIDE = 224  # small model inputs (32 px) are drawn larger, so the map can be read
REPORT_SIDE = 176  # report overlays: 16 per evaluation inlined as PNG stay near 1 MB of page
BATCH = 8  # images per forward+backward: the graph of a batch is kept until its backward


class ExplainError(TransferlabError):
    """A model for which no class-activation map can be computed."""


EXTRACTORS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMpp, "layercam": LayerCAM}


def check_method(method: str) -> type:
    """torchcam's extractor for `method`, or a clear error naming the valid ones."""
    if method not in EXTRACTORS:
        raise ExplainError(f"Unknown explanation method '{method}': choose one of {', '.join(EXTRACTORS)}.")
    return EXTRACTORS[method]


def overlay_folder(out_dir: str | Path) -> Path:
    """`out_dir`, created, checked writable before any image is scored (a clear error otherwise)."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ExplainError(f"--explain needs a folder for the overlays, but {path} is a file.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".transferlab-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ExplainError(f"Cannot write overlays into {path}: {exc.strerror or exc}") from exc
    return path


@dataclass(frozen=True)
class TargetLayer:
    """The module whose output the maps are made of, and how to read that output as (B, C, h, w)."""

    name: str  # dotted path in model.named_modules()
    layout: str  # "nchw" | "nhwc" | "tokens"
    grid: int  # side of the square map at the size it was found at
    prefix_tokens: int = 0  # tokens: class/register tokens before the grid

    def to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nhwc":
            return x.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            patches = x[:, self.prefix_tokens:, :]
            side = math.isqrt(patches.shape[1])
            return patches.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)
        return x

    def channels(self, shape: Sequence[int]) -> int:
        return shape[1] if self.layout == "nchw" else shape[-1]


def _as_map(shape: Sequence[int], size: int) -> TargetLayer | None:
    """How a module output of `shape` is a square spatial map of a `size`-px square probe, or None (the
    name is the caller's). A 1x1 map says nothing about where, so it is none."""
    if len(shape) == 4 and 1 < shape[2] == shape[3] <= size:
        return TargetLayer("", "nchw", shape[2])
    if len(shape) == 4 and 1 < shape[1] == shape[2] <= size:
        return TargetLayer("", "nhwc", shape[1])
    if len(shape) == 3:
        side = math.isqrt(shape[1])
        if 1 < side <= size and shape[1] - side * side <= MAX_PREFIX_TOKENS:
            return TargetLayer("", "tokens", side, shape[1] - side * side)
    return None


def find_target_layer(model: nn.Module, size: int) -> TargetLayer:
    """The layer to explain `model` by (see the module docstring): of the spatial maps a `size`-px probe
    image makes, the last one the logits depend on, preferring maps with as many channels as the head
    reads (so that a ViT's attention projections are passed over for the block's own tokens)."""
    seen: list[tuple[str, torch.Tensor, TargetLayer]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.requires_grad:
                found = _as_map(tuple(output.shape), size)
                if found is not None:
                    seen.append((name, output, TargetLayer(name, found.layout, found.grid, found.prefix_tokens)))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.enable_grad():
            logits = model(probe.to(device).requires_grad_(True))
    except RuntimeError as exc:
        raise ExplainError(f"{type(model).__name__} cannot run a {size}-px probe image: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    try:
        width = head_slot(model).in_features
    except HeadNotFound:
        width = None
    for wanted in ((width,) if width else ()) + (None,):
        for name, output, target in reversed(seen):
            if wanted is not None and target.channels(output.shape) != wanted:
                continue
            (grad,) = torch.autograd.grad(logits.sum(), output, retain_graph=True, allow_unused=True)
            if grad is not None and bool(target.to_nchw(grad).abs().sum() > 0):
                return target
    raise ExplainError(
        f"No layer of {type(model).__name__} gives a spatial map the prediction depends on at {size} px, so there "
        "is nothing to draw a class-activation map from. Supported: CNNs (NCHW or NHWC feature maps) and "
        "ViT-style token models whose patch tokens form a square grid.")


class CamExplainer:
    """Class-activation maps of one classifier (eval mode; BatchNorm may be folded: the maps need
    gradients of activations only, never of weights)."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, classes: Sequence[str],
                 method: str = "gradcam") -> None:
        self._extractor = check_method(method)
        self.model, self.preprocessing, self.classes, self.method = model, preprocessing, list(classes), method
        if model.training:
            raise ExplainError("explanations need the model in eval mode (model.eval())")
        _, self._pixels, self._to_input = eval_view(preprocessing)
        self.target = find_target_layer(model, preprocessing.input_size)

    def view(self, image: Image.Image) -> torch.Tensor:
        """The uint8 (3, S, S) pixels the model sees of `image` (resized and cropped as evaluated)."""
        return self._pixels(image)

    def heatmaps(self, pixels: Sequence[torch.Tensor], class_idx: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(maps (N, S, S) float32 in [0, 1], probabilities (N, classes)) for uint8 views; each map is of
        `class_idx[i]`, by default the predicted class."""
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        x = torch.stack([self._to_input(p) for p in pixels]).to(device).requires_grad_(True)
        with torch.enable_grad(), self._extractor(self.model, self.target.name,
                                                  reshape_transform=self._reshape()) as cam:
            scores = self.model(x)
            chosen = scores.argmax(1).tolist() if class_idx is None else [int(c) for c in class_idx]
            (maps,) = cam(class_idx=chosen, scores=scores)
        size = self.preprocessing.input_size
        maps = F.interpolate(maps.detach().float().unsqueeze(1), size=(size, size), mode="bilinear",
                             align_corners=False).squeeze(1).clamp_(0, 1)
        return maps.cpu().numpy(), scores.detach().float().softmax(1).cpu().numpy()

    def _reshape(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return None if self.target.layout == "nchw" else self.target.to_nchw


def render_overlay(pixels: torch.Tensor | np.ndarray, heatmap: np.ndarray, caption: str,
                   side: int | None = None) -> Image.Image:
    """The image as the model saw it with the map blended over it (jet: red is where the evidence is),
    `caption` written in a bar along the top; `side` px square (default: the view's, at least
    OVERLAY_MIN_SIDE)."""
    array = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    side = side or max(OVERLAY_MIN_SIDE, image.width)
    image = image.resize((side, side), Image.Resampling.BICUBIC)
    blended = overlay_mask(image, Image.fromarray(heatmap.astype(np.float32), mode="F"), "jet", alpha=0.5)
    draw = ImageDraw.Draw(blended)
    font = ImageFont.load_default(size=max(12, side // 16))
    box = draw.textbbox((0, 0), caption, font=font)
    draw.rectangle((0, 0, side, box[3] + 6), fill=(0, 0, 0))
    draw.text((4, 2), caption, fill=(255, 255, 255), font=font)
    return blended


def overlay_file_name(source: str | None, label: str, probability: float, taken: set[str]) -> str:
    """``<image stem>.<label>.<percent>.png``, made file-safe, and unique among `taken` (which it joins)."""
    stem = slug(Path(source).stem if source else "image", "image")
    safe_label = slug(label, "label")
    base = f"{stem}.{safe_label}.{round(100 * probability)}pct"
    name, n = f"{base}.png", 1
    while name in taken:
        n += 1
        name = f"{base}-{n}.png"
    taken.add(name)
    return name


def explain_entries(explainer: CamExplainer, entries: Iterable[dict[str, Any]], out_dir: Path, *,
                    batch_size: int = BATCH) -> Iterator[dict[str, Any]]:
    """Prediction entries ({"path", "predictions"} or {"path", "error"}, in order) with an "explanation"
    key added: the overlay PNG written into `out_dir` for the entry's top label. An image that cannot be
    read again gets "explanation_error" instead; entries keep their order."""
    index = {name: i for i, name in enumerate(explainer.classes)}
    taken: set[str] = set()
    held: list[dict[str, Any]] = []
    batch: list[tuple[dict[str, Any], torch.Tensor]] = []

    def flush() -> Iterator[dict[str, Any]]:
        if batch:
            top = [e["predictions"][0] for e, _ in batch]
            maps, _ = explainer.heatmaps([p for _, p in batch], [index[t["label"]] for t in top])
            for (entry, pixels), heatmap, t in zip(batch, maps, top):
                name = overlay_file_name(entry["path"], t["label"], t["probability"], taken)
                caption = f"{t['label']} {t['probability']:.2f}"
                render_overlay(pixels, heatmap, caption).save(out_dir / name)
                entry["explanation"] = str(out_dir / name)
            batch.clear()
        yield from held
        held.clear()

    for entry in entries:
        held.append(entry)
        if "predictions" in entry:
            try:
                batch.append((entry, explainer.view(load_image(entry["path"]))))
            except (ImageError, OSError) as exc:
                entry["explanation_error"] = str(getattr(exc, "reason", exc))
        if len(batch) >= batch_size:
            yield from flush()
    yield from flush()


def explain_evaluation(run_dir: str | Path, evaluation: Mapping[str, Any], out_dir: Path, *, errors: int = 8,
                       correct: int = 8) -> list[dict[str, Any]]:
    """Overlays of a saved evaluation's (``EvalResult.to_dict()``) worst errors and of its sample of correct
    predictions, each the map of the class predicted, written into `out_dir`: its interpretation rows with
    "kind" ("error" | "correct") and "overlay" (the PNG) added. Images that can no longer be read are left
    out (logged); an evaluation saved before correct samples were kept has errors only."""
    if evaluation.get("metrics", {}).get("task") == "multilabel":
        raise TransferlabError("class-activation maps are drawn for single-label models (one predicted class "
                               "per image); this model is multi-label")
    interp = evaluation["interpretation"]
    picks = [("error", r) for r in interp["top_losses"] if r["true"] != r["predicted"]][:errors]
    picks += [("correct", r) for r in interp.get("correct_sample", [])[:correct]]
    if not picks:
        return []
    model, meta = load_inference_model(run_dir)
    explainer = CamExplainer(model, Preprocessing.from_dict(meta["preprocessing"]), meta["classes"])
    index = {name: i for i, name in enumerate(explainer.classes)}
    kept: list[tuple[str, Mapping[str, Any], torch.Tensor]] = []
    for kind, row in picks:
        try:
            kept.append((kind, row, explainer.view(load_image(row["path"]))))
        except (ImageError, OSError) as exc:
            log.warning("no class-activation map of %s: %s", row["path"], getattr(exc, "reason", exc))
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    results = []
    for start in range(0, len(kept), BATCH):
        chunk = kept[start:start + BATCH]
        maps, _ = explainer.heatmaps([view for _, _, view in chunk], [index[row["predicted"]] for _, row, _ in chunk])
        for (kind, row, view), heatmap in zip(chunk, maps):
            path = out_dir / overlay_file_name(row["path"], row["predicted"], row["probability"], taken)
            render_overlay(view, heatmap, f"{row['predicted']} {row['probability']:.2f}", REPORT_SIDE).save(path)
            results.append({**row, "kind": kind, "overlay": str(path)})
    return results
