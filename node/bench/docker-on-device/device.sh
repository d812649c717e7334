#!/bin/bash
# Run on the device machine (run tool, carry target/dockerkit.tar.xz from make-kit.sh):
# starts dockerd without networking set-up, imports a busybox image and runs it
# under the job sandbox with one GPU injected (device nodes + libcuda bind),
# printing what the container sees; the engine log is left in $OUT.
set -x
K=/tmp/k; mkdir -p $K && tar -xJf target/dockerkit.tar.xz -C $K
export PATH=$K/bin:$PATH LD_LIBRARY_PATH=$K/lib
id; uname -r; grep -E "CapEff|Seccomp" /proc/self/status; ls -l /dev/nvidia* ; findmnt / ; cat /sys/fs/cgroup/cgroup.controllers 2>&1 | head -2
which curl
S=$K/docker.sock
(dockerd --iptables=false --bridge=none --ip-masq=false --data-root $K/data --exec-root $K/exec -H unix://$S --pidfile $K/d.pid > $OUT/dockerd.log 2>&1 &)
for i in $(seq 1 30); do curl -s --unix-socket $S http://x/version && break; sleep 1; done
echo
curl -s --unix-socket $S http://x/info | head -c 1500; echo
mkdir -p /tmp/rf/bin && cp $K/bin/busybox /tmp/rf/bin/ && tar -C /tmp/rf -cf /tmp/rf.tar .
curl -s --unix-socket $S -X POST "http://x/images/create?fromSrc=-&repo=bb&tag=1" --data-binary @/tmp/rf.tar -H 'Content-Type: application/x-tar'; echo
LIB=$(ldconfig -p | awk '/libcuda.so.1 .*x86-64/{print $NF; exit}')
cat > /tmp/c.json <<J
{"Image":"bb:1","User":"65534:65534","Cmd":["/bin/busybox","sh","-c","ls -l /dev/ /usr/local/nvidia/lib64; /bin/busybox wc -c /usr/local/nvidia/lib64/libcuda.so.1; id"],
 "HostConfig":{"NetworkMode":"none","ReadonlyRootfs":true,"CapDrop":["ALL"],"SecurityOpt":["no-new-privileges"],
  "Devices":[{"PathOnHost":"/dev/nvidia0","PathInContainer":"/dev/nvidia0","CgroupPermissions":"rwm"},{"PathOnHost":"/dev/nvidiactl","PathInContainer":"/dev/nvidiactl","CgroupPermissions":"rwm"},{"PathOnHost":"/dev/nvidia-uvm","PathInContainer":"/dev/nvidia-uvm","CgroupPermissions":"rwm"}],
  "Binds":["$LIB:/usr/local/nvidia/lib64/libcuda.so.1:ro"]}}
J
curl -s --unix-socket $S -X POST "http://x/containers/create?name=t" -H 'Content-Type: application/json' --data-binary @/tmp/c.json; echo
curl -s --unix-socket $S -X POST "http://x/containers/t/start"; echo
curl -s --unix-socket $S -X POST "http://x/containers/t/wait"; echo
curl -s --unix-socket $S "http://x/containers/t/logs?stdout=1&stderr=1" | tr -d '\000-\010' ; echo
tail -40 $OUT/dockerd.log
