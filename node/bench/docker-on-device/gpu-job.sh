#!/bin/bash
# Issue 18's proof, run on the lent H100 by the device tool:
#   bash node/bench/docker-on-device/make-kit.sh && bash node/bench/docker-on-device/pack-kiln.sh
#   run(carry=["target/dockerkit.tar.xz","target/kiln-bins.tar.xz"],
#       command="bash node/bench/docker-on-device/gpu-job.sh")
# Starts a Docker engine with no network set-up, then:
#  1. `kiln-node gemm` on bare metal (the baseline),
#  2. `kiln devnet` with one provider on this machine's GPU, and a Kiln job
#     (`gpus = 1`) running the same binary in Kiln's GPU image under the
#     full sandbox (the node picks its GPU path itself: doctor says which),
#  3. bare metal again; then compares products (BLAKE3) and GFLOP/s.
# Everything it prints and the logs land in $OUT.
set -x
N=${N:-8192}; SEED=${SEED:-42}; REPEATS=${REPEATS:-20}; GPUS=${GPUS:-1}  # GPUS=0: a dry run on a machine without one
K=/tmp/k; mkdir -p $K/bin $K/lib && tar -xJf target/dockerkit.tar.xz -C $K && tar -xJf target/kiln-bins.tar.xz -C $K/bin
export PATH=$K/bin:$PATH
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv
S=$K/docker.sock
# dockerd --bridge=none deletes the docker0 interface at start: beside
# another engine (a dry run on a workstation) that breaks its bridge
# network. The lent GPU machine has none.
if ip link show docker0 >/dev/null 2>&1; then
  echo "another Docker engine's docker0 bridge exists here; this script's engine would delete it. Run it on a machine without Docker (the lent GPU machine), or restore docker0 afterwards." >&2
  exit 2
fi
echo '{}' > $K/daemon.json  # never the host's /etc/docker/daemon.json
start_engine() {
  (LD_LIBRARY_PATH=$K/lib setsid dockerd --config-file $K/daemon.json --iptables=false --bridge=none --ip-masq=false "$@" \
     --data-root $K/data --exec-root $K/exec -H unix://$S --pidfile $K/d.pid >> $OUT/dockerd.log 2>&1 &)
  for i in $(seq 1 20); do curl -sf --unix-socket $S http://x/version >/dev/null && return 0; sleep 1; done
  return 1
}
start_engine || { kill $(cat $K/d.pid) 2>/dev/null; sleep 2; echo "retrying with vfs"; start_engine --storage-driver vfs; } || { tail -30 $OUT/dockerd.log; exit 1; }
export DOCKER_HOST=unix://$S
curl -s --unix-socket $S http://x/info | head -c 600; echo
kiln-node doctor > $OUT/doctor.txt 2>&1; cat $OUT/doctor.txt | head -40
kiln-node gemm $N $SEED --repeats $REPEATS --out /tmp > $OUT/bare1.json; cat $OUT/bare1.json
IMG=$(kiln image gpu-workload --kiln-node $K/bin/kiln-node | head -1); echo "image $IMG"
(setsid kiln devnet --providers 1 > $OUT/devnet.log 2>&1 &)
for i in $(seq 1 240); do grep -q "export KILN_COORDINATOR" $OUT/devnet.log && break; sleep 1; done
grep -E "demo|export|error|Error" $OUT/devnet.log | head -20
export KILN_COORDINATOR=http://127.0.0.1:8730
kiln providers
cat > /tmp/job.toml <<J
image = "$IMG"
command = ["$N", "$SEED", "--repeats", "$REPEATS"]
[resources]
cpus = 2
memory = "4GiB"
gpus = $GPUS
timeout = "5m"
max_price_per_hour = "50cr"
J
kiln --json job submit /tmp/job.toml > $OUT/submit.json; cat $OUT/submit.json
ID=$(python3 -c "import json; print(json.load(open('$OUT/submit.json'))['job_id'])")
for i in $(seq 1 200); do kiln --json job status $ID > /tmp/st.json; python3 -c "import json,sys; s=json.load(open('/tmp/st.json'))['state']; sys.exit(0 if s in ('completed','failed','timed_out','cancelled') else 1)" && break; sleep 2; done
kiln job status $ID | tee $OUT/job-status.txt
kiln job logs $ID --raw > $OUT/job-logs.txt 2>&1; cat $OUT/job-logs.txt
kiln job get $ID -o /tmp/jobout; cat /tmp/jobout/gemm.txt
kiln-node gemm $N $SEED --repeats $REPEATS --out /tmp > $OUT/bare2.json; cat $OUT/bare2.json
python3 - <<P | tee $OUT/summary.txt
import json,re
def report(text):
    m=re.search(r'\{"n".*\}', text)
    return json.loads(m.group(0)) if m else None
b=[r for r in (report(open('$OUT/bare%d.json'%i).read()) for i in (1,2)) if r]
if not b:
    print('bare metal: no report (no GPU here?)'); b=[{'gflops':float('nan'),'blake3':''}]
logs=open('$OUT/job-logs.txt').read()
j=report(logs)
import os
prod=open('/tmp/jobout/gemm.txt').read() if os.path.exists('/tmp/jobout/gemm.txt') else ''
print('bare metal GFLOP/s', [round(x['gflops'],1) for x in b])
if j:
    best_bare=max(x['gflops'] for x in b)
    print('kiln job GFLOP/s', round(j['gflops'],1), 'on', j.get('gpu_uuid'))
    print('ratio kiln/bare %.4f' % (j['gflops']/best_bare))
    print('same product', all(x['blake3']==j['blake3'] for x in b) and j['blake3'] in prod)
else:
    print('the Kiln job printed no report')
P
grep -iE "gpu path|gpu_path|injection|cdi|toolkit" $OUT/devnet.log | head
tail -5 $OUT/dockerd.log
# Stop what this started (the device machine is bare after, but a dry run
# elsewhere must not leave an engine and a devnet behind).
pkill -f "kiln devnet --providers 1"; sleep 2; kill $(cat $K/d.pid) 2>/dev/null; true
