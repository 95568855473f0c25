"""`metascale bench es`: what ES workers send per meta-step, and iMAML's memory as the inner loop grows.

es_bytes_per_worker_step: the pickled size of what one worker returns from a meta-step for a ~10M-parameter model
(an MLP 1 -> 3163 -> 3163 -> 1 on sinusoid tasks): `fitness` under ES, against `compute` (the summed meta-gradient)
under backprop, measured on the same worker in the same run. Pickle protocol 5 is what Ray's serializer produces
for these plain dicts of floats and numpy arrays (up to framing).
imaml_memory_ratio: the peak resident memory one iMAML meta-gradient adds (bench/peak.py: after a warm-up call) at 20
inner steps over that at 5, each in a fresh child process; second-order MAML's ratio is the baseline.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

from metascale.bench.peak import added_bytes, in_fresh_process, settle

WORKLOAD = {  # the memory workload: Conv-4 on 84x84 images, 5-way 1-shot, 5 queries, 2 tasks
    "model": {"name": "conv4", "variant": "miniimagenet", "in_channels": 3, "hidden": 32, "image_size": 84},
    "data": {"source": "synthetic", "ways": 5, "shots": 1, "queries": 5, "image_size": 84, "channels": 3},
}


def _bytes(pairs_per_worker: int) -> dict[str, Any]:
    from metascale.cluster.coordinator import Coordinator
    from metascale.cluster.messages import WorkItem
    from metascale.cluster.replica import Replica
    from metascale.config import parse_spec
    from metascale.models import build_model, count_params

    raw = {
        "model": {"name": "mlp", "hidden": [3163, 3163]},
        "algorithm": {"name": "maml", "inner": {"lr": 0.01}},
        "outer": {"estimator": "es", "es": {"tasks": 1}},
        "cluster": {"address": "inline"},
    }
    spec = parse_spec(raw)
    params = Coordinator(spec).published()
    worker = Replica(spec)
    t0 = time.perf_counter()
    es_result = worker.run(WorkItem("fitness", 0, tuple(range(pairs_per_worker))), params)
    es_s = time.perf_counter() - t0
    bp_result = worker.run(WorkItem("meta_gradient", 0, (0,)), params)
    return {
        "model_params": count_params(build_model(spec.model, 1)),
        "es_pairs_per_worker": pairs_per_worker,
        "es_bytes_per_worker_step": len(pickle.dumps(es_result, protocol=5)),
        "backprop_bytes_per_worker_step": len(pickle.dumps(bp_result, protocol=5)),
        "es_worker_s_per_pair_10m": es_s / pairs_per_worker,
    }


def peak_child(algorithm: str, steps: int) -> float:
    """Runs in a fresh process (bench/peak.py): the MiB one meta-gradient adds at its peak, after a warm-up call."""
    import torch

    from metascale.algorithms import build_algorithm
    from metascale.algorithms.executor import meta_gradient
    from metascale.config import parse_spec
    from metascale.data import build_task_source, output_dim
    from metascale.models import build_model

    torch.set_num_threads(1)
    spec = parse_spec({**WORKLOAD, "algorithm": {"name": algorithm, "inner": {"steps": steps, "lr": 0.01}}})
    torch.manual_seed(0)
    model = build_model(spec.model, output_dim(spec.data))
    alg = build_algorithm(spec.algorithm, model)
    batch = build_task_source(spec.data, "train", 0).batch(0, range(2))
    params = alg.init(dict(model.named_parameters()))
    meta_gradient(alg, params, batch)
    base = settle()
    meta_gradient(alg, params, batch)
    return added_bytes(base) / 2**20


def _peak(algorithm: str, steps: int) -> float:
    return in_fresh_process(f"{__name__}:peak_child", algorithm=algorithm, steps=steps)


def run(pairs_per_worker: int = 4) -> dict[str, Any]:
    result: dict[str, Any] = _bytes(pairs_per_worker)
    for alg in ("imaml", "maml"):
        at5, at20 = _peak(alg, 5), _peak(alg, 20)
        result[f"{alg}_peak_added_mib_5_steps"] = round(at5, 1)
        result[f"{alg}_peak_added_mib_20_steps"] = round(at20, 1)
        result[f"{alg}_memory_ratio"] = round(at20 / at5, 3)
    result["targets"] = {"es_bytes_per_worker_step": "<= 4096", "imaml_memory_ratio": "<= 1.2"}
    return result
