"""`metascale export`: a checkpoint's model weights as one safetensors file that the model itself loads, for use
outside metascale (`model.load_state_dict(safetensors.torch.load_file(path), strict=True)`).

What is written: every entry of the model's `state_dict()`, under its own key. Parameters take their meta-learned
values (`Coordinator.model_state()`: the meta-parameters that are model weights, without e.g. Meta-SGD's learned
rates or a learned loss's network). Buffers (a model may register running statistics, masks, position tables) are
not meta-parameters: the coordinator never trains them and workers hold them fixed (algorithms/base.py: Functional),
so they are exported as the model builds them from the job spec, which is what every task of the run used.
Tensors keep the run's dtype (`executor.dtype`). The file's metadata: `format: pt`, the step, the job name and its
`model` section (JSON). A DARTS network (`model.name: darts`) also gets its derived discrete cell, the strongest op
other than 'none' on every edge with all the ops' softmax weights, as JSON beside the file (`NAME.architecture.json`)
and in the metadata (`metascale.architecture`), and the printed line lists the cell's edges and its `genotype` (the
value of `model.genotype` that retrains it as a fixed cell; a fixed cell's export lists that genotype).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from metascale.cluster import checkpoint
from metascale.config import JobSpec, load_spec, parse_spec
from metascale.errors import CheckpointError, MetascaleError

SPEC_SUFFIXES = (".yaml", ".yml")


def model_weights(spec: JobSpec, state: dict[str, Any], what: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's full state dict with the checkpoint's meta-learned weights in it, and the names of its buffers
    (see the module's docstring)."""
    from metascale.cluster.coordinator import Coordinator, check_compatible

    coord = Coordinator(spec)
    check_compatible(coord, state, what)
    with torch.no_grad():
        for k, p in coord.params.items():
            p.copy_(state["params"][k])
    trained = coord.model_state()
    model = coord.algorithm.f.model
    full = model.state_dict()
    foreign = sorted(set(trained) - set(full))
    if foreign:
        raise MetascaleError(f"{what}: meta-parameters {foreign[:3]} are not entries of the model's state_dict")
    untrained = sorted(set(dict(model.named_parameters())) - set(trained))
    if untrained:  # every algorithm meta-learns all of the model's weights; one that did not must say how to export
        raise MetascaleError(f"{what}: the checkpoint holds no meta-learned value for parameters {untrained[:3]}")
    weights = {k: (trained[k] if k in trained else v).detach().contiguous().clone() for k, v in full.items()}
    return weights, [k for k in full if k not in trained]


def _source(source: str) -> tuple[JobSpec, int | None, dict[str, Any]]:
    """(spec, step, state) for a job spec (its newest good checkpoint) or a checkpoint (the spec it records)."""
    if source.endswith(SPEC_SUFFIXES) and Path(source).is_file():
        spec = load_spec(source)
        directory = spec.path(spec.checkpoint.dir)
        found = checkpoint.load_latest(directory)
        if found is None:
            raise CheckpointError(f"no readable checkpoint in {directory}: train first (metascale run {source})")
        return spec, found[0], found[1]
    step, state = checkpoint.resolve(source)
    text = state.get("spec")
    if not isinstance(text, str):
        raise CheckpointError(f"{source}: the checkpoint records no job spec; pass the job spec instead")
    return parse_spec(yaml.safe_load(text), f"{source} (the spec it records)"), step, state


def export_model(source: str, to: str) -> dict[str, Any]:
    from safetensors.torch import save as save_safetensors

    spec, step, state = _source(source)
    if spec.algorithm.name == "distill":  # no model weights: the distilled set itself
        return export_distilled(spec, step, state, to)
    weights, buffers = model_weights(spec, state, f"export of {source}")
    metadata = {
        "format": "pt",
        "metascale.job": spec.name,
        "metascale.step": str(step),
        "metascale.model": json.dumps(spec.model.model_dump(mode="json"), sort_keys=True),
    }
    architecture = _architecture(spec, weights)
    if architecture is not None:
        metadata["metascale.architecture"] = json.dumps(architecture, sort_keys=True)
    data = save_safetensors(weights, metadata=metadata)
    _write(to, data)
    result = {"exported": to, "step": step, "tensors": len(weights), "buffers": len(buffers), "bytes": len(data)}
    if architecture is not None:
        beside = re.sub(r"\.safetensors$", "", to) + ".architecture.json"
        _write(beside, (json.dumps(architecture, indent=2) + "\n").encode())
        result["architecture"] = beside
        result["cell"] = [f"{e['to']} <- {e['from']}: {e['op']}" for e in architecture["edges"]]
        result["genotype"] = [e["op"] for e in architecture["edges"]]  # model.genotype's value to retrain this cell
    return result


def _architecture(spec: JobSpec, weights: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """A DARTS network's derived discrete cell (models/darts.py `derive`); None for models without one."""
    if spec.model.name != "darts":
        return None
    from metascale.models.darts import ALPHA, derive, fixed

    if spec.model.genotype is not None:  # a retrained fixed cell: its genotype, nothing derived
        return fixed(spec.model.genotype, list(spec.model.ops), spec.model.nodes)
    return derive(weights[ALPHA], list(spec.model.ops), spec.model.nodes)


def export_distilled(spec: JobSpec, step: int | None, state: dict[str, Any], to: str) -> dict[str, Any]:
    """A distilled set (algorithms/distill.py) as a NumPy .npz any tool reads: `images` [N, *shape] float, `labels`
    [N] int64 (class i's images_per_class images in a row), `inner_lr` (the learned rate the set trains with)."""
    import io

    import numpy as np

    from metascale.algorithms.distill import IMAGES, LOG_LR

    if not to.endswith(".npz"):
        raise MetascaleError(f"{to}: a distilled set exports as a .npz file (arrays images, labels, inner_lr)")
    images = state["params"][IMAGES].detach().cpu().numpy()
    per_class = spec.algorithm.distill.images_per_class
    labels = np.repeat(np.arange(len(images) // per_class), per_class)
    buf = io.BytesIO()
    np.savez(buf, images=images, labels=labels, inner_lr=np.exp(float(state["params"][LOG_LR])))
    _write(to, buf.getvalue())
    return {"exported": to, "step": step, "images": len(images), "bytes": len(buf.getvalue())}


def _write(to: str, data: bytes) -> None:
    from fsspec.implementations.local import LocalFileSystem

    from metascale.cluster.storage import url_to_fs
    from metascale.files import atomic_write

    fs, path = url_to_fs(to)
    try:
        if isinstance(fs, LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        else:
            fs.pipe_file(path, data)
    except OSError as e:
        raise CheckpointError(f"{to}: cannot be written ({e.strerror or e})") from None
