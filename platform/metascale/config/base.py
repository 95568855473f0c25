"""What every section of the job spec shares: the strict base model and the constrained number types."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class Spec(BaseModel):
    """Base of every section: unknown keys are errors (a typo must never be silently ignored), and so are NaN and
    infinities in any float field (YAML reads `.inf`/`.nan` as numbers; no knob means anything at them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
