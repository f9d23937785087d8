"""Flower server side: the ServerApp, its round loop and one strategy per file.

Importing this package imports every module in it, so each strategy file's
``@STRATEGIES.register`` has run: adding a strategy is adding one file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
