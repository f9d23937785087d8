"""Client programs, chosen by ``[client] program`` in a scenario.

Importing this package imports every module in it, so each program's
``@CLIENT_PROGRAMS.register`` has run: adding a program is adding one file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
