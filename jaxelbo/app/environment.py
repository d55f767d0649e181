"""What every jaxelbo result records about where it ran: device, versions, date."""

from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
from typing import Any


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Device (platform, kind, counts), library versions, float64 switch and UTC date."""
    import jax

    import jaxelbo

    dev = jax.devices()[0]
    versions: dict[str, str | None] = {"jaxelbo": jaxelbo.__version__, "jax": jax.__version__,
                                       "python": platform.python_version()}
    for name in ("jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy", *extra_packages):
        versions[name] = package_version(name)
    return {
        "device": {"platform": dev.platform, "device_kind": dev.device_kind,
                   "num_devices": jax.device_count(), "device_count": jax.device_count(),
                   "process_count": jax.process_count(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine()},
        "versions": versions,
        "x64": bool(jax.config.read("jax_enable_x64")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
