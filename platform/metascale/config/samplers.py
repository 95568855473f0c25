"""`data.sampler`: how an episode's shape is drawn. `fixed` (the default) is N-way K-shot Q-query from `data.ways`,
`shots`, `queries`; `meta_dataset` is the variable-way variable-shot sampler of Meta-Dataset (Triantafillou et al.,
ICLR 2020, appendix), with its reference implementation's defaults (google-research/meta-dataset,
`meta_dataset/data/config.py`, `sampling.py`). The sampler itself is data/sampler.py."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from metascale.config.sections import PositiveInt, Spec


class FixedSampler(Spec):
    """Every episode `ways` classes, `shots` support and `queries` query examples per class."""

    name: Literal["fixed"] = "fixed"


class MetaDatasetSampler(Spec):
    """ways ~ U[min_ways, min(max_ways, classes)]; queries per class = min(max_queries, floor(min chosen count / 2));
    support size = min(max_support, sum_c floor(beta * min(max_support_per_class, count_c - queries) + 1)), beta ~
    U[0, 1); shots_c = min(floor(p_c * (size - ways)) + 1, count_c - queries), p proportional to count_c * exp(U[log
    weight range])."""

    name: Literal["meta_dataset"] = "meta_dataset"
    min_ways: Annotated[int, Field(ge=2)] = 5
    max_ways: PositiveInt = 50
    max_queries: PositiveInt = 10
    max_support: PositiveInt = 500
    max_support_per_class: PositiveInt = 100
    log_weight: tuple[float, float] = (math.log(0.5), math.log(2.0))

    @model_validator(mode="after")
    def _bounds(self) -> "MetaDatasetSampler":
        if self.min_ways > self.max_ways:
            raise ValueError(f"min_ways ({self.min_ways}) must be <= max_ways ({self.max_ways})")
        if self.max_support < self.max_ways:
            raise ValueError(
                f"max_support ({self.max_support}) must be >= max_ways ({self.max_ways}): every class "
                "needs a support example"
            )
        if self.log_weight[0] > self.log_weight[1]:
            raise ValueError(f"log_weight must be (low, high) with low <= high (got {self.log_weight})")
        return self


def _by_name(v: Any) -> Any:
    """`sampler: meta_dataset` is `sampler: {name: meta_dataset}` with its defaults."""
    return {"name": v} if isinstance(v, str) else v


SamplerSpec = Annotated[Union[FixedSampler, MetaDatasetSampler], Field(discriminator="name")]


FIXED_WAYS_OK = (
    "protonet",
)  # prototypes per episode: any number of classes; every other algorithm has a ways-wide head


def episodes_problem(job: Any) -> str | None:
    """What in `job` cannot take variable-way episodes, or a multi-source mix's splits (None: fine)."""
    data, alg = job.data, job.algorithm.name
    for split in dict.fromkeys(("train", job.eval.split)):
        if getattr(data, "source", None) == "multi" and not data.serving(split):
            return f"data.sources: no source serves split '{split}' (add it to a source's serves)"
    if not getattr(data, "variable", False):
        return None
    if alg not in FIXED_WAYS_OK:
        return (
            f"data.sampler 'meta_dataset' draws a different number of ways per episode; algorithm.name '{alg}' "
            f"adapts a fixed data.ways-wide head: use algorithm.name {' or '.join(FIXED_WAYS_OK)}, or data.sampler "
            "fixed"
        )
    if job.executor.strategy == "vmap":
        return (
            "executor.strategy 'vmap' stacks equal-shaped episodes; data.sampler 'meta_dataset' episodes differ "
            "in shape: use 'per_task' or 'auto' (which runs them per task)"
        )
    if job.outer.estimator == "ftml":
        return "outer.estimator 'ftml' with data.sampler 'meta_dataset': the online stream takes fixed-shape episodes"
    return None
