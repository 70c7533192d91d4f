#!/usr/bin/env bash
# Installs the bench's load generator when missing: h2load and nghttp (Debian's nghttp2-client),
# used by the `workers` scenario (bench/h2load.py) and its tests. A machine that has both skips
# apt. Run by `make bench`, `make bench-quick` and `make test`; uses sudo when not root.
set -euo pipefail

command -v h2load >/dev/null && command -v nghttp >/dev/null && exit 0
echo "installing nghttp2-client (h2load, nghttp)"
sudo=()
[[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends nghttp2-client
