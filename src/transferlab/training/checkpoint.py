"""Resumable training state as safetensors + JSON (no pickle anywhere).

An optimizer/scheduler state dict is a tree of numbers, lists and tensors: tensors go to the
safetensors file under a flat key, and the tree keeps a {"__tensor__": key} placeholder.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.errors import RunDirError
from transferlab.io import atomic_write_json, load_tensors, read_json, save_tensors, tensor_metadata


def split_tensors(tree: Any, prefix: str, out: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by placeholders, collecting them in `out`."""
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(k): split_tensors(v, f"{prefix}.{k}", out) for k, v in tree.items()} | (
            {"__int_keys__": True} if tree and all(isinstance(k, int) for k in tree) else {}
        )
    if isinstance(tree, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(tree)]
    return tree


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        int_keys = tree.get("__int_keys__", False)
        return {
            (int(k) if int_keys else k): join_tensors(v, tensors)
            for k, v in tree.items()
            if k != "__int_keys__"
        }
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_training_state(path: Path, model_state: dict[str, torch.Tensor], trees: dict[str, Any], info: dict[str, Any]) -> None:
    """`path`.json holds the tree and names the tensors file, `path`-<id>.safetensors. The tensors are
    written under a fresh name first, then the JSON replaces the old one (the commit point), then the
    older tensors file is removed: a kill at any moment leaves one complete, matching pair."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model_state.items()}
    skeleton = {name: split_tensors(tree, name, tensors) for name, tree in trees.items()}
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    state_id = uuid.uuid4().hex
    tensors_file = f"{path.name}-{state_id[:12]}.safetensors"
    save_tensors(path.parent / tensors_file, tensors, metadata={"state_id": state_id})
    atomic_write_json(path.with_suffix(".json"), {"info": info, "trees": skeleton, "rng": rng_meta,
                                                  "num_tensors": len(tensors), "state_id": state_id,
                                                  "tensors_file": tensors_file})
    for old in path.parent.glob(f"{path.name}-*.safetensors"):
        if old.name != tensors_file:
            old.unlink(missing_ok=True)


def tensors_path(path: Path) -> Path:
    """The safetensors file that the checkpoint `path` (without suffix) commits to."""
    return _tensors_file(path, read_json(path.with_suffix(".json"))["tensors_file"])


def _tensors_file(path: Path, name: str) -> Path:
    """`name` as a file beside the checkpoint: `save_training_state` writes a bare file name there, so a
    path (absolute, '..', a sub-folder) is a damaged or hostile checkpoint, refused before it is opened."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise RunDirError(f"{path.with_suffix('.json')} names its tensors file {name!r}, which is not a file beside "
                          "it in the run directory: refusing to read it. This checkpoint cannot be resumed from")
    return path.parent / name


def load_training_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], dict]:
    """→ (model_state, trees, info, rng) ; raises FileNotFoundError/RunDirError when absent/corrupt."""
    meta = read_json(path.with_suffix(".json"))
    if not isinstance(meta, dict) or not isinstance(meta.get("tensors_file"), str):
        raise RunDirError(f"{path.with_suffix('.json')} is not a transferlab checkpoint; it cannot be resumed from")
    weights = _tensors_file(path, meta["tensors_file"])
    if not weights.exists():
        raise RunDirError(f"{weights} is missing; the checkpoint {path.with_suffix('.json')} cannot be resumed from")
    tensors = load_tensors(weights)
    if len(tensors) != meta.get("num_tensors") or tensor_metadata(weights).get("state_id") != meta.get("state_id"):
        raise RunDirError(f"{weights} does not match {path.with_suffix('.json')} (different saves); "
                          "this checkpoint cannot be resumed from")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    trees = {name: join_tensors(tree, tensors) for name, tree in meta["trees"].items()}
    return model_state, trees, meta["info"], {"tensors": tensors, "meta": meta["rng"]}
