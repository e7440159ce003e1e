"""Flow matching: the sampling schedule, guidance, and the training noise, target and loss."""

from .flow_match import FlowMatchScheduler, shift_schedule

__all__ = ["FlowMatchScheduler", "shift_schedule"]
