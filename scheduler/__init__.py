"""Request scheduling and paged KV-cache block management, in plain Python over integers."""

from scheduler.block_pool import BlockPool
from scheduler.config import SchedulerConfig
from scheduler.errors import RequestRejected
from scheduler.kv_cache_manager import KVCacheManager, PrefixCacheStats
from scheduler.output import RequestUpdate, ScheduledRequest, SchedulerOutput, SchedulerStats
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.scheduler import Scheduler

__all__ = [
    "BlockPool",
    "FinishReason",
    "KVCacheManager",
    "PrefixCacheStats",
    "Request",
    "RequestRejected",
    "RequestStatus",
    "RequestUpdate",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
]
