"""Request queues and batching in front of a model's instances."""
from kiln.server.scheduling.dynamic_batcher import BatchPolicy
from kiln.server.scheduling.scheduler import Scheduler

__all__ = ["BatchPolicy", "Scheduler"]
