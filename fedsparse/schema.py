"""The pydantic configuration every model of a scenario shares: scenario sections, plugin
parameters, compressor specs and any nested table they hold.

Unknown keys are rejected, a validated scenario is frozen, types are strict (a bool is not
an int, nor is 2.0 or "2"; an int still passes for a float) and numbers are finite (no
``inf`` or ``nan``).
"""

from typing import Literal

from pydantic import ConfigDict

SCENARIO_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

# A choice between the project's behaviour and a method's official release (README, "Notes
# and deviations": the table of switches).
ReleaseChoice = Literal["fedsparse", "release"]
