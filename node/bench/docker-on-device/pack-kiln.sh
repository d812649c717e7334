#!/usr/bin/env bash
# Packs the release `kiln` and `kiln-node` binaries into target/kiln-bins.tar.xz,
# to carry to the lent GPU machine beside target/dockerkit.tar.xz (see
# gpu-job.sh). Build them first: cargo build --release -p kiln-cli -p kiln-node
set -euo pipefail
cd "$(dirname "$0")/../../.."
tar -C target/release -cJf target/kiln-bins.tar.xz kiln kiln-node
ls -la target/kiln-bins.tar.xz
