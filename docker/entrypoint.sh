#!/bin/sh
# Migrate the job table (idempotent), then run the given scp-node command (default: serve).
set -eu
scp-node db upgrade --config /app/config.toml
exec scp-node "$@"
