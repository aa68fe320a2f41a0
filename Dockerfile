# lbd in a container (docs/deploy.md has the docker and Kubernetes commands):
#   docker build -t lbd .
#   docker run --rm -v "$PWD/lbd.yaml:/etc/lbd/lbd.yaml:ro" -p 8080:8080 lbd
# The config is mounted at /etc/lbd/lbd.yaml (a ConfigMap in Kubernetes); the image has none.
# HEALTHCHECK asks the admin API at LBD_HEALTHZ_URL: the default is the default
# admin.address, 127.0.0.1:9180; a config that moves the admin API sets it with -e.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lbd ./lbd
# A wheel of lbd and of every dependency (all have binary wheels: no compiler in slim), with
# the kubernetes extra: the DaemonSet runs `source: kubernetes`.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[kubernetes]"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LBD_HEALTHZ_URL=http://127.0.0.1:9180/healthz
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 lbd \
    && useradd --system --uid 10001 --gid lbd --no-create-home --shell /usr/sbin/nologin lbd \
    && mkdir -p /etc/lbd
# Not root, no capabilities: Docker lets a container's processes bind ports below 1024 in its
# own network namespace (net.ipv4.ip_unprivileged_port_start=0). With --network host, run
# ports >= 1024, or --user 0 --cap-drop ALL --cap-add NET_BIND_SERVICE.
USER 10001:10001
# 9180: the admin API (/healthz, /readyz, /metrics). Service ports come from the config.
EXPOSE 9180
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['LBD_HEALTHZ_URL'], timeout=2)"]
ENTRYPOINT ["lbd"]
CMD ["run", "/etc/lbd/lbd.yaml"]
