"""How a meta-step's update direction is computed across the workers (after learned_optimization's gradient
estimators): each estimator maps (pool, slot groups, step, published params) to one aggregated `StepResult`.

'backprop': every worker returns the summed meta-gradient of its slots, the coordinator sums them in slot order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from metascale.cluster.coordinator import StepResult, aggregate

Estimator = Callable[[Any, Sequence[Sequence[int]], int, Any], StepResult]


def backprop(pool: Any, groups: Sequence[Sequence[int]], step: int, params_ref: Any) -> StepResult:
    return aggregate(pool.map("compute", groups, step, params_ref))


ESTIMATORS: dict[str, Estimator] = {"backprop": backprop}
