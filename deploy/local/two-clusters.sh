#!/usr/bin/env bash
# Two local-mode clusters, component by component: what `isthmus up` does,
# spelled out, for running the pieces under your own supervisor.
# Usage: deploy/local/two-clusters.sh [state-root]   (Ctrl-C stops everything)
set -euo pipefail
root=${1:-/tmp/isthmus-local}
bin=${ISTHMUS:-isthmus}
mkdir -p "$root/east" "$root/west"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM

start() { "$bin" "$@" & pids+=($!); }

# east: controller, gateway, echo workload with its sidecar
start controller --dir "$root/east" --cluster east \
  --control-addr 127.0.1.1:15010 --peering-addr 127.0.1.1:15011 --admin-addr 127.0.1.1:15022
start gateway --dir "$root/east" --tunnel-addr 127.0.1.2:15008 --quic-addr 127.0.1.2:15443 \
  --admin-addr 127.0.1.2:15021
start echo --cluster east --listen 127.0.1.20:8080 --instance echo-east-1
start sidecar --dir "$root/east" --namespace demo --service echo --port 8080 \
  --app 127.0.1.20:8080 --inbound-addr 127.0.1.20:15006 --outbound-addr 127.0.1.20:15001 \
  --admin-addr 127.0.1.20:15020

# west: controller, gateway, a client-only workload's sidecar
start controller --dir "$root/west" --cluster west \
  --control-addr 127.0.2.1:15010 --peering-addr 127.0.2.1:15011 --admin-addr 127.0.2.1:15022
start gateway --dir "$root/west" --tunnel-addr 127.0.2.2:15008 --quic-addr 127.0.2.2:15443 \
  --admin-addr 127.0.2.2:15021
start sidecar --dir "$root/west" --namespace demo --service-account client \
  --inbound-addr 127.0.2.30:15006 --outbound-addr 127.0.2.30:15001 \
  --admin-addr 127.0.2.30:15020

echo "started; now: isthmus token create --dir $root/east, isthmus link --dir $root/west <token>,"
echo "isthmus export --dir $root/east demo/echo, curl -x http://127.0.2.30:15001 http://echo.demo.svc.clusterset.local:8080/"
wait
