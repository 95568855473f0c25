"""Knobs of the spurious-feature domain-generalisation task (data/spurious.py), where MLDG's gradient alignment
must matter: an invariant feature and a spurious one whose relation to the label differs across domains."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from metascale.config.base import PositiveFloat, PositiveInt, Spec


class SpuriousData(Spec):
    """Binary labels y, s = 2y - 1. Every domain draws x = [s + invariant_noise * e1, a * s + spurious_noise * e2]
    (e1, e2 standard normal): the first feature predicts y by the same mechanism everywhere but noisily, the second
    through the domain's own a, precisely. `domains` lists a for each source domain, `target` a for the held-out
    domain (test split). Pooled sources with mean a > 0 reward leaning on the spurious feature; a target a < 0 makes
    that wrong. Per train step, as data.source 'domains': `batch` examples of each source, `meta_test_domains` of
    them the meta-test domains (query)."""

    source: Literal["spurious"] = "spurious"
    domains: list[float] = [1.0, 1.0, -1.0]  # the spurious feature's mean for y = 1, per source domain
    target: float = -1.0  # the same for the held-out domain
    invariant_noise: PositiveFloat = 1.5  # invariant feature alone: accuracy Phi(1 / invariant_noise)
    spurious_noise: PositiveFloat = 0.1
    per_domain: PositiveInt = 400  # training examples per source domain
    test_per_domain: PositiveInt = 1000  # held-out examples per domain (target: test split; sources: val)
    batch: PositiveInt = 32  # examples per source domain in a train step
    eval_batch: PositiveInt = 200  # examples per evaluation slot
    meta_test_domains: PositiveInt = 1

    @property
    def ways(self) -> int:
        """Two classes (the model's head size, data.output_dim)."""
        return 2

    @model_validator(mode="after")
    def _sizes(self) -> "SpuriousData":
        if len(self.domains) < self.meta_test_domains + 1:
            raise ValueError(
                f"{len(self.domains)} source domain(s) cannot be split into meta-train and "
                f"{self.meta_test_domains} meta-test domain(s): add domains or lower meta_test_domains"
            )
        if self.batch > self.per_domain:
            raise ValueError(
                f"batch ({self.batch}) exceeds a domain's training examples (per_domain = {self.per_domain})"
            )
        return self
