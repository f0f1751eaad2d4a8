# One image for every Isthmus component: controller, gateway, sidecar, and
# the pod's redirection step (`isthmus redirect`, which needs nft, or
# iptables where nftables is absent). Debian slim rather than distroless
# for that one step's tools; the binary itself needs only glibc.
#
#   docker build -t isthmus:0.1.0 .
#   isthmus install --cluster east --image <registry>/isthmus:0.1.0 | kubectl apply -f -
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p isthmus --bin isthmus

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/isthmus /usr/local/bin/isthmus
# Components run unprivileged (the manifests set their users: 65532 for the
# controller and gateway, 1337 for sidecars); only the redirection step runs
# as root, with NET_ADMIN.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/isthmus"]
