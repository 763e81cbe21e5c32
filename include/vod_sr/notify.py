"""How a run tells people how it went. Nothing configured: nothing is added to the DAG."""

from __future__ import annotations

from typing import Any

from include.vod_sr.settings import Settings


def notification_kwargs(settings: Settings, *, scheduled: bool) -> dict[str, Any]:
    """DAG arguments (callbacks, deadline alerts) for the notifications the settings ask for."""
    return {}
