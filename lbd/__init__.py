"""lbd: a userspace L4 load balancer that does on one host what Kubernetes Services do."""

__version__ = "0.1.0"
