#!/usr/bin/env bash
# Installs what building the Node and C++ clients needs (tests/clients build both from proto/),
# from Debian's packages, only when something is missing: a machine that has it all skips apt.
# Run by `make test`; uses sudo when not root.
set -euo pipefail

PACKAGES=(protobuf-compiler protobuf-compiler-grpc libgrpc++-dev libprotobuf-dev cmake g++ make pkg-config)
missing_tools() {
  local tool
  for tool in protoc grpc_cpp_plugin cmake g++ pkg-config node npm; do
    command -v "$tool" >/dev/null || echo "$tool"
  done
  pkg-config --exists grpc++ protobuf 2>/dev/null || echo "grpc++ headers"
}

missing="$(missing_tools | tr '\n' ' ')"
[[ -z "$missing" ]] && exit 0
echo "installing client toolchains (missing: $missing)"
packages=("${PACKAGES[@]}")
# Node 20 (with its npm) is on the image; Debian's nodejs and npm (Node 18) are the fallback
# for a machine without Node. Never npm alone: Debian's npm conflicts with NodeSource's nodejs.
command -v node >/dev/null || packages+=(nodejs npm)
sudo=()
[[ "$(id -u)" -eq 0 ]] || sudo=(sudo)
"${sudo[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
