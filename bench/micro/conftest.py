"""Fixtures of the micro-benchmarks.

Not collected by a plain ``pytest`` (the project's testpaths is ``tests``); run them with
``.venv/bin/pytest bench/micro --benchmark-only``, in one process: the suite's workers
(``-n 4`` in the project's addopts) are turned off here, as pytest-benchmark would turn off
the benchmarks under them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from edgelink.config import MODULE_DEFAULTS, load_settings
from edgelink.gateway.prediction import HealthPredictor


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """No xdist workers: before xdist's own pytest_configure starts them, and before
    pytest-benchmark's reads ``dist``."""
    config.option.numprocesses, config.option.dist = 0, "no"


@pytest.fixture(scope="session")
def settings() -> Any:
    """Default settings with the nine modules enabled, as in the load benchmark."""
    return load_settings(env={"VX11_GATEWAY_TOKEN": "bench-token", "SHUB_ENABLED": "true"})


@pytest.fixture(scope="session")
def nine_modules() -> dict[str, dict[str, Any]]:
    """What a probe round returns when all nine modules answer: ModuleHealth per module."""
    return {name: {"status": "ok", "http_code": 200, "latency_ms": 1.234, "url": url, "error": None}
            for name, _, url in MODULE_DEFAULTS}


@pytest.fixture()
def status_request(settings: Any, nine_modules: dict[str, dict[str, Any]]) -> Any:
    """A stand-in for the request ``GET /vx11/status`` gets: the app's probe round answers at once."""

    async def check_all() -> dict[str, dict[str, Any]]:
        return nine_modules

    app = SimpleNamespace(settings=settings, port=8000, stopping=False,
                          modules=SimpleNamespace(check_all=check_all),
                          prediction=HealthPredictor([m.name for m in settings.modules if m.enabled],
                                                     settings.prediction_window))
    return SimpleNamespace(runtime=app)
