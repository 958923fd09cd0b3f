"""A stateful local Hetzner Cloud simulator: `Simulator` in-process, `python -m dabei_component.sim serve`."""

from .simulator import Simulator
from .state import Durations

__all__ = ["Durations", "Simulator"]
