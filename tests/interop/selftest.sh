#!/usr/bin/env bash
# Check the interop peers against each other, with no mesh in between: every
# gRPC case and the WebSocket client modes must pass, and broken setups (closed
# port, wrong protocol, missing header) must fail. Loopback only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$("$here/setup.sh" | tail -n1)"
tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# start NAME SCRIPT: run a server on port 0 and set $port from its {"port": N}.
start() {
  "$py" "$here/$2" --port 0 >"$tmp/$1.out" 2>"$tmp/$1.err" &
  pids+=($!)
  for _ in $(seq 100); do
    port="$("$py" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["port"])' \
      "$tmp/$1.out" 2>/dev/null)" && return 0
    sleep 0.1
  done
  echo "$1 did not report its port" >&2
  cat "$tmp/$1.err" >&2
  exit 1
}

passed=0 failed=0
# expect pass|fail DESCRIPTION CMD...: run CMD, compare its exit status.
expect() {
  local want="$1" what="$2"
  shift 2
  local got=pass
  "$@" >"$tmp/last.out" 2>&1 || got=fail
  if [[ "$got" == "$want" ]]; then
    passed=$((passed + 1))
    echo "ok   $what"
  else
    failed=$((failed + 1))
    echo "FAIL $what (expected $want, got $got):"
    sed 's/^/     /' "$tmp/last.out"
  fi
}

start grpc grpc_server.py
gport=$port
start ws ws_server.py
wport=$port

for case in unary server_stream client_stream bidi metadata deadline cancel health large status; do
  expect pass "grpc $case" "$py" "$here/grpc_client.py" --target "127.0.0.1:$gport" --case "$case"
done
expect pass "grpc all, mesh-style authority" "$py" "$here/grpc_client.py" \
  --target "127.0.0.1:$gport" --authority hello.demo.svc.clusterset.local:50051 --case all
expect fail "grpc against a closed port" "$py" "$here/grpc_client.py" \
  --target 127.0.0.1:1 --connect-timeout 1 --case unary
expect fail "grpc against the websocket server" "$py" "$here/grpc_client.py" \
  --target "127.0.0.1:$wport" --connect-timeout 1 --case unary

expect pass "ws echo" "$py" "$here/ws_client.py" --url "ws://127.0.0.1:$wport/echo"
expect pass "ws --host" "$py" "$here/ws_client.py" --url "ws://127.0.0.1:$wport/echo" \
  --host echo.demo.svc.clusterset.local:8080 --messages 4 \
  --expect-header host=echo.demo.svc.clusterset.local:8080
expect pass "ws --connect-to, paced over 2s" "$py" "$here/ws_client.py" \
  --url ws://echo.demo.svc.clusterset.local:8080/echo --connect-to "127.0.0.1:$wport" \
  --messages 8 --seconds 2 --expect-header host=echo.demo.svc.clusterset.local:8080
expect fail "ws missing expected header" "$py" "$here/ws_client.py" \
  --url "ws://127.0.0.1:$wport/" --messages 2 --expect-header x-isthmus-client-id
expect fail "ws against a closed port" "$py" "$here/ws_client.py" --url ws://127.0.0.1:1/
expect fail "ws against the grpc server" "$py" "$here/ws_client.py" \
  --url "ws://127.0.0.1:$gport/" --timeout 2

echo "$passed passed, $failed failed"
((failed == 0))
