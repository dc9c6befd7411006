"""A trained run's model for inference (checked, folded, nothing unpickled), and the inputs to predict.

The model is rebuilt from model.json (architecture, head, classes, preprocessing) and its weights
come only from model.safetensors — nothing is unpickled. Unreadable files get an "error" entry and
never stop the batch. Predicting itself is ``export.batch`` (shared with ONNX models); torch loads only
inside ``load_run_model``: this module is imported on the torch-free ONNX path too.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.data.images import IMAGE_EXTENSIONS
from transferlab.errors import RunDirError
from transferlab.paths import hidden_under
from transferlab.run_dir import model_files

if TYPE_CHECKING:
    import torch


def load_run_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode, model.json metadata) from a run directory. model.json is checked against
    the tensors in model.safetensors before anything is built or allocated; weights that are not all
    finite are refused."""
    import torch

    from transferlab.io import load_tensors, read_json, tensor_shapes
    from transferlab.models.heads import build_classifier

    run = Path(run)
    if not run.exists():
        raise RunDirError(f"Run directory '{run}' does not exist.")
    meta_path, weights_path = model_files(run)
    if not meta_path.exists() or not weights_path.exists():
        raise RunDirError(
            f"'{run}' holds no trained model (model.json + model.safetensors). "
            "Train one with `transferlab train DATA --out DIR`, or --resume an interrupted run."
        )
    meta = read_json(meta_path)
    spec, num_classes, head = _architecture(meta, meta_path)
    # The architecture model.json describes, built on the meta device (shapes without storage), must
    # have exactly the file's tensors: a num_classes or hidden size of 10**9 costs nothing to describe
    # there, and would otherwise be allocated before load_state_dict could report the mismatch.
    try:
        with torch.device("meta"):
            described = build_classifier(spec, num_classes, head, load_weights=False)
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunDirError(f"{meta_path} describes a model that cannot be built ({reason}); retrain it.") from None
    expected = described.state_dict()
    _check_shapes({k: tuple(v.shape) for k, v in expected.items()}, tensor_shapes(weights_path),
                  weights_path, meta_path)
    state = load_tensors(weights_path)
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise RunDirError(
            f"{weights_path} holds NaN or infinite weights ({len(broken)} tensors, e.g. {', '.join(broken[:3])}): "
            "the model would predict nothing but NaN. It came from a diverged or damaged run; retrain it "
            "(a run that diverges stops and keeps its last good model)."
        )
    model = _with_weights(described, {k: v.to(expected[k].dtype) for k, v in state.items()})
    if model is None:
        model = build_classifier(spec, num_classes, head, load_weights=False)
        model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta


def _with_weights(described: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """The meta-device model with the file's tensors as its parameters and buffers, or None when it
    holds a tensor the file does not (a non-persistent buffer made at construction): then only a real
    build has it. Spares a second construction, its weight init and a copy of every tensor."""
    import torch

    described.load_state_dict(state, strict=True, assign=True)
    for module in described.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False),
                   *(v for v in vars(module).values() if isinstance(v, torch.Tensor))]
        if any(t.is_meta for t in tensors):
            return None
    return described


def _architecture(meta: Any, meta_path: Path):
    """(backbone spec, num_classes, head config) from model.json, every field checked: a damaged or
    hand-edited file is a RunDirError naming the field, never a traceback."""
    from transferlab.models.heads import HeadConfig
    from transferlab.models.registry import BackboneSpec

    def bad(what: str) -> RunDirError:
        return RunDirError(f"{meta_path} is damaged: {what}. Re-export or retrain the model to recreate it.")

    if not isinstance(meta, dict):
        raise bad("it is not a JSON object")
    classes, num_classes = meta.get("classes"), meta.get("num_classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("'classes' is not a list of class names")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes != len(classes):
        raise bad(f"'num_classes' is {num_classes!r} but 'classes' names {len(classes)}")
    try:
        spec = BackboneSpec.from_dict(meta["backbone"])
        head = HeadConfig.from_dict(meta["head"])
        from transferlab.data.transforms import Preprocessing

        Preprocessing.from_dict(meta["preprocessing"])
    except KeyError as exc:
        raise bad(f"it has no {exc} entry") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise bad(str(exc)) from None
    return spec, num_classes, head


def _check_shapes(described: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]],
                  weights_path: Path, meta_path: Path) -> None:
    differ = [f"{k}: {list(stored[k])} in the file, {list(v)} in model.json's architecture"
              for k, v in described.items() if k in stored and stored[k] != v]
    missing = sorted(set(described) - set(stored))
    unexpected = sorted(set(stored) - set(described))
    if differ or missing or unexpected:
        details = "; ".join(differ[:3] + [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise RunDirError(
            f"{weights_path} does not match {meta_path.name} ({len(differ)} of another shape, "
            f"{len(missing)} missing, {len(unexpected)} unexpected tensors: {details}); the run directory is "
            "inconsistent or damaged. Retrain, or restore both files from the same run."
        )


def load_inference_model(run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """`load_run_model` for paths that only infer (evaluate, predict, serve): BatchNorm folded into the
    convolutions before it (models/fold_bn.py: same outputs to ~1e-6, Lite0 fp32 2.2x faster on a CPU).
    Not for parameter counts or export, which describe the model as trained."""
    from transferlab.models.fold_bn import folded_for_inference

    model, meta = load_run_model(run)
    return folded_for_inference(model, int(meta["preprocessing"]["input_size"])), meta


def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """Files, folders (recursive, image extensions) and globs → (path, error-or-None), in order."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not hidden_under(f, p))
            if not files:
                yield p, "folder holds no images"
            yield from ((f, None) for f in files)
        elif p.is_file():
            yield p, None
        elif any(ch in str(item) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not matches:
                yield p, "pattern matched no files"
            yield from ((m, None) for m in matches)
        else:
            yield p, "no such file or directory"
