"""Shared test settings: hypothesis runs derandomized with no deadline, so CI is repeatable
on a slow shared 2-core machine."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "tensorsam",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tensorsam"))
