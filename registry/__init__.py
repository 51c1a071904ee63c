"""The registry of NSA implementations (installed as `ejkernel_nsa.registry`)."""

from ejkernel_nsa.registry.core import (
    KNOWN_BACKENDS,
    Backend,
    BackendError,
    Implementation,
    Plan,
    backend_description,
    backend_status,
    forced_for,
    implementations,
    is_interpreted,
    load_backends,
    register,
    register_backend,
    resolve,
)

__all__ = [
    "KNOWN_BACKENDS",
    "Backend",
    "BackendError",
    "Implementation",
    "Plan",
    "backend_description",
    "backend_status",
    "forced_for",
    "implementations",
    "is_interpreted",
    "load_backends",
    "register",
    "register_backend",
    "resolve",
]
