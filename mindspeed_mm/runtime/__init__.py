"""Device adaptor and distributed start-up shared by every entry point."""

from .device import (
    current_device,
    detect_device_type,
    get_device_type,
    resolve_backend,
    synchronize,
)
from .initialize import (
    ParallelConfigError,
    ParallelLayout,
    destroy_runtime,
    initialize_distributed,
    initialize_model_parallel,
    initialize_runtime,
    set_random_seed,
    validate_parallel_layout,
)

__all__ = [
    "ParallelConfigError",
    "ParallelLayout",
    "current_device",
    "destroy_runtime",
    "detect_device_type",
    "get_device_type",
    "initialize_distributed",
    "initialize_model_parallel",
    "initialize_runtime",
    "resolve_backend",
    "set_random_seed",
    "synchronize",
    "validate_parallel_layout",
]
