"""The admin HTTP API and its client (``lbd status``, ``lbd explain``)."""
