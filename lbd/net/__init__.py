"""Sockets and bytes: listeners, upstream connects, the TCP proxy. Knows nothing of YAML."""
