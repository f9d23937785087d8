"""Accounting: training FLOPs, bytes on the wire, timers."""
