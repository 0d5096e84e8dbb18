"""A private instance of fakesnow's server module, for pgsnow's local Snowflake.

``fakesnow/__init__.py`` defines a ``server()`` context manager that relies on importing the
``fakesnow.server`` submodule (which rebinds the package attribute ``fakesnow.server``). Importing
that submodule ourselves would change what ``fakesnow.server`` means for other code in the same
process, and would share fakesnow's module-level session table. So the same installed source is
loaded under a private module name: our own ``sessions``, ``routes`` and ``query_request``, and
``fakesnow.server`` left exactly as fakesnow expects. Its ``to_sf`` (Arrow result conversion) is
replaced by one that keeps NULL timestamps NULL (``pgsnow.local.sf_arrow``).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from pgsnow.local.sf_arrow import keeping_nulls

PRIVATE_MODULE_NAME = "pgsnow_local_fakesnow_server"


def _load_private_server_module() -> ModuleType:
    if (loaded := sys.modules.get(PRIVATE_MODULE_NAME)) is not None:
        return loaded
    # find_spec imports the fakesnow package but not its server submodule.
    source = importlib.util.find_spec("fakesnow.server")
    if source is None or source.origin is None:
        raise ImportError("fakesnow[server] is not installed")
    spec = importlib.util.spec_from_file_location(PRIVATE_MODULE_NAME, source.origin)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load fakesnow's server module from {source.origin}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as the import system does, so dataclasses can find it.
    sys.modules[PRIVATE_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


server_module = _load_private_server_module()
# Result batches keep NULL timestamps NULL (fakesnow drops the struct's validity mask).
server_module.to_sf = keeping_nulls(server_module.to_sf)  # type: ignore[attr-defined]

__all__ = ["server_module"]
