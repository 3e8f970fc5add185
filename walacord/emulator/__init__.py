"""Walacor API emulator with fault injection, for development, tests and benchmarks."""

from walacord.emulator.app import Emulator, running_emulator
from walacord.emulator.faults import MODES, FaultSpec

__all__ = ["MODES", "Emulator", "FaultSpec", "running_emulator"]
