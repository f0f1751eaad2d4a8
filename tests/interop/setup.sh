#!/usr/bin/env bash
# Prepare the interop peers: Debian tools (curl, h2load, nft, iptables,
# dnsmasq, node), a Python venv with requirements.txt, and grpc-js from
# node/package-lock.json (under target/interop-node). Idempotent and cheap when already done. All progress goes
# to stderr; the last (only) stdout line is the venv's python path.
#
#   ISTHMUS_INTEROP_VENV  venv location (default: <repo>/target/interop-venv)
#   ISTHMUS_INTEROP_NODE  grpc-js install (default: <repo>/target/interop-node)
#   PYTHON                interpreter to create the venv with (default: python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${ISTHMUS_INTEROP_VENV:-$repo/target/interop-venv}"
python="${PYTHON:-python3}"
req="$here/requirements.txt"

log() { echo "interop setup: $*" >&2; }

# --- Debian packages, only for commands that are missing --------------------
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v h2load >/dev/null || missing+=(nghttp2-client)
# Transparent-mode tests: nftables in a network namespace; dnsmasq as the
# DNS server whose answers change under a gateway.
command -v nft >/dev/null || missing+=(nftables)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v dnsmasq >/dev/null || missing+=(dnsmasq-base)
# grpc-js, the pure JavaScript gRPC: a client that shares no code with C-core.
command -v npm >/dev/null || missing+=(nodejs npm)
# Debian ships venv/ensurepip separately from python3 (package python3-venv).
if ! command -v "$python" >/dev/null || ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3 python3-venv)
fi
if ((${#missing[@]})); then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq >&2
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- venv --------------------------------------------------------------------
mkdir -p "$(dirname "$venv")"
# Serialise concurrent runs (e.g. parallel tests) on the same venv.
exec 9>"$venv.lock"
flock 9

# The stamp ties the venv to this requirements.txt and interpreter version.
want="$(cat "$req" <("$python" -VV) | sha256sum | cut -d' ' -f1)"
stamp="$venv/.isthmus-requirements.sha256"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
  && "$venv/bin/python" -c 'import grpc, grpc_health, websockets' 2>/dev/null; then
  log "venv up to date: $venv"
else
  log "creating venv $venv"
  # Only ever delete something that is a venv (guards a mistyped override).
  if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    log "refusing to replace $venv: exists and is not a venv"
    exit 1
  fi
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
  # Wheels only: building grpcio from source takes very long; fail fast instead.
  "$venv/bin/python" -m pip install --disable-pip-version-check -q \
    --only-binary=:all: -r "$req" >&2
  echo "$want" >"$stamp"
fi

# --- grpc-js (npm ci from the committed lock) ---------------------------------
node_dir="${ISTHMUS_INTEROP_NODE:-$repo/target/interop-node}"
lock="$here/node/package-lock.json"
want_node="$(cat "$here/node/package.json" "$lock" | sha256sum | cut -d' ' -f1)"
node_stamp="$node_dir/.isthmus-lock.sha256"
if [[ -f "$node_stamp" && "$(cat "$node_stamp")" == "$want_node" ]] \
  && [[ -d "$node_dir/node_modules/@grpc/grpc-js" ]]; then
  log "grpc-js up to date: $node_dir"
else
  log "installing grpc-js into $node_dir"
  mkdir -p "$node_dir"
  cp "$here/node/package.json" "$lock" "$node_dir/"
  (cd "$node_dir" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2)
  echo "$want_node" >"$node_stamp"
fi

echo "$venv/bin/python"
