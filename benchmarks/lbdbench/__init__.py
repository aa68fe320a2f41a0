"""lbd's benchmark harness: targets (proxies), backends, workloads, statistics and reports."""
