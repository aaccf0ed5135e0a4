"""The engine-free policy core: the pin/TTL/ordering rules that both vLLM and the simulator drive.

Its ports: an engine is an :class:`EngineView` and calls a :class:`PolicyDriver` at its hooks; a policy is a
:class:`PinRule` (one class per policy, :data:`ctk.policy.rules.RULES`); what happens is told to an
:class:`EventSink`. Nothing here imports vLLM or reads a clock.
"""

from ctk.policy.driver import EngineView, PolicyDriver
from ctk.policy.events import EventSink
from ctk.policy.rules import PinRule

__all__ = ["EngineView", "EventSink", "PinRule", "PolicyDriver"]
