#!/usr/bin/env bash
# The comparison suite in one command: builds in release mode, checks the peer servers (Debian packages
# redis-server, rabbitmq-server, nats-server; Zenoh is a crate), runs every scenario (each system starts and
# stops its own server on free loopback ports), prints one table and writes
# target/bench-results/compare.{json,csv,svg}. Extra arguments go to the suite:
#   --quick            10x fewer messages, 10 s idle-CPU window (a smoke run, ~3 minutes)
#   --only a,b         systems: aion-inprocess aion-memory aion-durable aion-grpc-py redis-aion rabbitmq
#                      nats-core nats-jetstream zenoh footprint (aion-grpc-py: Python with grpcio and
#                      grpcio-tools, as .ci/run installs them), and across two hosts (network namespaces as root, else
#                      loopback): x-aion-memory x-aion-durable x-zenoh x-nats-core x-nats-jetstream
#   --small-only       the 100-byte rows only
#   --idle-secs N      idle-CPU window of the footprint (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for s in redis-server nats-server; do command -v "$s" >/dev/null || missing+=("$s"); done
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=("rabbitmq-server")
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing peer servers: ${missing[*]} (sudo apt-get install -y redis-server rabbitmq-server nats-server);" \
       "their systems are skipped" >&2
fi
cargo build --release -p aion-peers
# The trivial gRPC server the aion-grpc-py rows compare with (benches/grpc_py.py).
cargo build --release --example grpc-trivial
# Built on its own, so the peers' dependencies do not add features to it (the footprint is the shipped binary).
cargo build --release --bin aion
AION_BIN="$PWD/target/release/aion" exec target/release/aion-peers "$@"
