"""Client programs, chosen by ``[client] program`` in a scenario.

Each program's module registers it with ``@CLIENT_PROGRAMS.register`` when it is imported;
:func:`fedsparse.registry.load_plugins` imports every module here, so adding a program is
adding one file.
"""
