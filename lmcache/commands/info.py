"""``lmcache info``: version, installed backends with their devices and kernel paths."""

from __future__ import annotations

import platform

HELP = "show the version, the installed backends, their devices and the kernel path each would use"


def add_arguments(parser) -> None:
    pass


def describe() -> list[dict]:
    """One dict per registered backend: name, installed, devices, kernel path or the error met."""
    from ..backends import available, get_backend, registered

    rows = []
    installed = set(available())
    for name in registered():
        row = {"backend": name, "installed": name in installed, "devices": [], "kernel_path": ""}
        if row["installed"]:
            try:
                be = get_backend(name)
                row["devices"] = be.devices()
                row["kernel_path"] = be.kernel_path()
            except Exception as e:  # installed but unusable: say why instead of failing
                row["kernel_path"] = f"unusable: {type(e).__name__}: {e}"
        else:
            from ..backends import _install_hint

            row["kernel_path"] = f"not installed ({_install_hint(name)})"
        rows.append(row)
    return rows


def run(args) -> int:
    import numpy

    from .. import __version__

    print(f"lmcache {__version__}  (Python {platform.python_version()}, numpy {numpy.__version__}, "
          f"{platform.machine()})")
    for row in describe():
        devices = ", ".join(row["devices"]) or "-"
        print(f"  {row['backend']:<6} {'yes' if row['installed'] else 'no ':<4} devices: {devices:<20} "
              f"kernels: {row['kernel_path']}")
    print("optional: " + ", ".join(f"{name} {'yes' if found else 'no'}" for name, found in optional_components()))
    return 0


def optional_components() -> list[tuple[str, bool]]:
    """Which optional packages the integrations and the tiered store can use (found without importing them)."""
    import importlib.util

    names = (("transformers (HFCache)", "transformers"), ("redis-py (remote tier)", "redis"), ("hiredis", "hiredis"),
             ("xxhash (checksums)", "xxhash"), ("cryptography (AES-GCM)", "cryptography"))
    return [(label, importlib.util.find_spec(mod) is not None) for label, mod in names]
