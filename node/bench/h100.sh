#!/usr/bin/env bash
# Kiln GPU acceptance run, for the GPU machine (no Rust, no Docker needed).
#
# From the repository root, with the release binary carried at
# .device/kiln-node (cargo build --release -p kiln-node && mkdir -p .device
# && cp target/release/kiln-node .device/):
#
#     bash node/bench/h100.sh
#
# Writes into $OUT (default ./h100-out): env.txt, nvidia-smi.csv,
# kiln-benchmark.json/.log/.rc, kiln-doctor.json/.log/.rc,
# kiln-benchmark-driver.json/.log/.rc (the driver-only PTX engine),
# torch-reference.json/.log, comparison.txt and summary.json.
# Exit code: compare.py's (0 when every required check passes).
# Takes about 1-2 minutes; every step has a time limit (under 5 minutes in all).
#
# cuBLAS is deliberately NOT put on LD_LIBRARY_PATH: kiln-node must find
# libcublas.so.13 under /usr/local/cuda/targets/x86_64-linux/lib by itself.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/h100-out}
BIN=${KILN_NODE_BIN:-$PWD/.device/kiln-node}
SIZE=${KILN_BENCH_SIZE:-8192}
COPY_MIB=${KILN_BENCH_COPY_MIB:-1024}
mkdir -p "$OUT"
STATE=$(mktemp -d)
chmod +x "$BIN" 2>/dev/null || true

{
  date -u
  uname -a
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  ls -l /usr/local/cuda/targets/x86_64-linux/lib/libcublas* 2>&1
  ldconfig -p 2>/dev/null | grep -E 'libcublas|libcuda.so|libnvidia-ml' || true
  nvidia-smi 2>&1
  "$BIN" --version 2>&1
} > "$OUT/env.txt" 2>&1

nvidia-smi --query-gpu=name,uuid,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current,power.limit,compute_cap,mig.mode.current,temperature.gpu \
  --format=csv > "$OUT/nvidia-smi.csv" 2>&1

echo "== kiln-node benchmark (cuBLAS, n=$SIZE)"
timeout 150 "$BIN" benchmark --json --size "$SIZE" --copy-mib "$COPY_MIB" --state-dir "$STATE" \
  > "$OUT/kiln-benchmark.json" 2> "$OUT/kiln-benchmark.log"
echo $? > "$OUT/kiln-benchmark.rc"

echo "== kiln-node doctor"
timeout 60 "$BIN" doctor --json --state-dir "$STATE" > "$OUT/kiln-doctor.json" 2> "$OUT/kiln-doctor.log"
echo $? > "$OUT/kiln-doctor.rc"

echo "== PyTorch reference (n=$SIZE)"
timeout 150 python3 node/bench/reference.py --size "$SIZE" --copy-mib "$COPY_MIB" \
  > "$OUT/torch-reference.json" 2> "$OUT/torch-reference.log"

echo "== kiln-node benchmark --engine driver (PTX kernel, n=4096)"
timeout 90 "$BIN" benchmark --json --engine driver --size 4096 --cpu-size 64 --copy-mib 256 --state-dir "$STATE" \
  > "$OUT/kiln-benchmark-driver.json" 2> "$OUT/kiln-benchmark-driver.log"
echo $? > "$OUT/kiln-benchmark-driver.rc"

echo "== comparison"
python3 node/bench/compare.py "$OUT" | tee "$OUT/comparison.txt"
rc=${PIPESTATUS[0]}
rm -rf "$STATE"
exit "$rc"
