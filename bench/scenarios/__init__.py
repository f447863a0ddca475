"""
The scenarios, in the order C{all} runs them.

To add one: subclass L{bench.runner.Scenario} in a module here (its
parameters, its node config, its worker role, and C{drive}), and list it
below.
"""

from __future__ import annotations

from bench.runner import Scenario
from bench.scenarios.codec import Codec
from bench.scenarios.direct import Direct
from bench.scenarios.group import GroupFanout
from bench.scenarios.login import LoginStorm
from bench.scenarios.soak import Soak
from bench.scenarios.vroom import VroomFanout

SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (LoginStorm(), Direct(), GroupFanout(), VroomFanout(), Codec(), Soak())
}
