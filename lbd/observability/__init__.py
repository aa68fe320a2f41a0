"""Logs (and, later, metrics): defined once, used everywhere."""
