"""The dynamic batcher: queues, futures, deadlines, priorities, merge and split."""

from headrace.batching.batcher import DynamicBatcher
from headrace.batching.policy import BatchPolicy

__all__ = ["BatchPolicy", "DynamicBatcher"]
