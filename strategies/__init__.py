"""Flower server side: the ServerApp, its round loop and one strategy per file.

Each strategy file registers itself with ``@STRATEGIES.register`` when it is imported;
:func:`fedsparse.registry.load_plugins` imports every module here, so adding a strategy is
adding one file. The package itself imports nothing: ``flwr run`` looks up the ServerApp's
module (``importlib.util.find_spec``, which imports this package) to validate the app, and
importing every strategy (torch among them) cost it 1.7 s of every run's start.
"""
