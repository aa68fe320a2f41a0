#!/usr/bin/env bash
# Install everything the benchmark suite needs. Safe to run again: apt and pip skip what is there.
# Usage: bash benchmarks/setup.sh   (Debian/Ubuntu; apt-get runs through sudo when not root)
set -euo pipefail

APT_PACKAGES=(
  haproxy              # reference balancer (TCP mode)
  nginx                # HTTP backend for the request workloads; also the nginx stream target
  libnginx-mod-stream  # nginx "stream" (L4 TCP/UDP proxy) module
  iperf3               # bulk throughput workload
  wrk                  # HTTP load generator (connections/s, keep-alive requests/s)
  util-linux           # taskset: pins load generator and proxy to different CPUs
  dnsmasq-base         # DNS server of the dns-sessions workload (the binary, no system service)
)
PIP_PACKAGES=(matplotlib pyyaml)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  as_root=()
  if ((EUID != 0)); then as_root=(sudo); fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Where systemd runs, the Debian nginx package also starts a system nginx on port 80. The suite
# runs its own instances with private configs on 127.x addresses and never touches that one.

python3 -m pip install -q "${PIP_PACKAGES[@]}"

# lbd itself (editable), when the benchmarks live inside the lbd repository.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -f "$repo_root/pyproject.toml" ]] && ! command -v lbd >/dev/null 2>&1; then
  python3 -m pip install -q -e "$repo_root"
fi

for tool in haproxy nginx iperf3 wrk taskset; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is still missing" >&2; exit 1; }
done
ls /usr/lib/nginx/modules/ngx_stream_module.so >/dev/null
echo "benchmark dependencies are installed"
