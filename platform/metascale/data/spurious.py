"""Domains that differ only in a spurious feature's relation to the label: a task where MLDG's mechanism must
matter (config/spurious.py holds the knobs).

To first order MLDG's objective L_tr(theta) + beta L_te(theta - alpha grad L_tr) is L_tr + beta L_te - alpha beta
grad L_tr . grad L_te (Li et al. 2018): it rewards parameters whose gradients agree across the source
domains, as gradient matching does (Fish: Shi et al. 2022, "Gradient Matching for Domain Generalization"). Here the
invariant feature's gradient points the same way in every domain, the spurious feature's does not (its sign a
differs between sources), while pooled over the sources it still predicts the label, so pooled ERM leans on it and
is fooled by a target domain where a flips. Colored MNIST (Arjovsky et al. 2019, "Invariant Risk Minimization") has
the spurious correlation of one sign in every source: there the sources' gradients agree on it too, and the
alignment term has nothing to penalise, which is why this task's sources disagree.

As a TaskSource, like data/domains.py: a train task is one MLDG step (support: the meta-train sources' examples,
query: the meta-test sources'); a test task's query is a slice of the target's held-out examples, a val task's a
slice of the sources' held-out examples (model selection without the target). Every draw is a pure function of
(seed, split, step, slot).
"""

from __future__ import annotations

import numpy as np

from metascale.config import SpuriousData
from metascale.data.domains import DomainEpisodes
from metascale.data.tasks import Split

_TAG = 0x5350  # keys this source's generators apart from other sources' under the same seed


def draw_domain(spec: SpuriousData, a: float, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n examples of the domain with spurious mean a: float32 [n, 2] (invariant, spurious), int64 labels [n]."""
    y = rng.integers(0, 2, n)
    s = 2.0 * y - 1.0
    x = np.stack(
        [s + spec.invariant_noise * rng.standard_normal(n), a * s + spec.spurious_noise * rng.standard_normal(n)], 1
    )
    return x.astype(np.float32), y


class SpuriousTasks(DomainEpisodes):
    def __init__(self, spec: SpuriousData, split: Split, seed: int):
        self.spec, self.split, self.seed = spec, split, seed
        n, held = spec.per_domain, spec.test_per_domain
        self.sources = list(range(len(spec.domains)))  # train's indices
        self.train, val = [], []
        for i, a in enumerate(spec.domains):  # source i: its training examples, then its held-out ones
            x, y = draw_domain(spec, a, n + held, np.random.default_rng(np.random.SeedSequence([seed, _TAG, 0, i])))
            self.train.append((x[:n], y[:n]))
            val.append((x[n:], y[n:]))
        if split == "test":
            held_out = [
                draw_domain(spec, spec.target, held, np.random.default_rng(np.random.SeedSequence([seed, _TAG, 1])))
            ]
        else:
            held_out = val
        x, y = np.concatenate([x for x, _ in held_out]), np.concatenate([y for _, y in held_out])
        order = np.random.default_rng(np.random.SeedSequence([seed, _TAG, 2])).permutation(len(y))  # mixed slices
        self.eval_x, self.eval_y = x[order], y[order]
