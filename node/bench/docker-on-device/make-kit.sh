#!/usr/bin/env bash
# Packs a Docker engine that runs without installation (Debian 12's dockerd,
# containerd, the runc shim, runc, libdevmapper, and busybox-static for a
# test image) into target/dockerkit.tar.xz (~36 MB), to carry to a machine
# that has no engine (the lent H100): see device.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
(cd "$w" && apt-get download docker.io containerd runc busybox-static >/dev/null)
for d in "$w"/*.deb; do dpkg-deb -x "$d" "$w/x"; done
mkdir -p "$w/kit/bin" "$w/kit/lib"
cp "$w/x/usr/sbin/dockerd" "$w/x/usr/bin/containerd" "$w/x/usr/bin/containerd-shim-runc-v2" \
   "$w/x/usr/sbin/runc" "$w/x/bin/busybox" "$w/kit/bin/"
cp -L /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 "$w/kit/lib/"
mkdir -p target
tar -C "$w/kit" -cJf target/dockerkit.tar.xz .
ls -la target/dockerkit.tar.xz
