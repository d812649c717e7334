#!/usr/bin/env python3
"""PyTorch reference figures for `kiln-node benchmark`, same sizes and same
timing procedure (node/src/bench/gpu.rs):

* matmul C = A @ B, n x n, inputs uniform in [-1, 1), BF16 and FP16 (FP32
  accumulation, the cuBLAS default) and FP32 with TF32 disabled;
* device-to-device copy of COPY bytes, counted as 2*COPY moved (read + write);
* pinned host->device and device->host copies of COPY bytes.

Timing: one call; then warm-up calls for >= 250 ms (at least 3); then three
trials of max(5, ceil(250 ms / t)) calls each (t = mean warm-up call), each
timed with CUDA events on the current stream; the best trial counts.

Prints one JSON object on stdout.
"""
import argparse
import json
import math
import sys

import torch

WARMUP_MS = 250.0
TRIAL_MS = 250.0
TRIALS = 3


def time_calls(fn, iters):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end), 1e-6)


def measure(fn):
    first = time_calls(fn, 1)
    warm = min(max(math.ceil(WARMUP_MS / first), 3), 2000)
    per = time_calls(fn, warm) / warm
    iters = min(max(math.ceil(TRIAL_MS / per), 5), 5000)
    best = min(time_calls(fn, iters) / iters for _ in range(TRIALS))
    return iters, best


def matmul(n, dtype):
    a = (torch.rand(n, n, device="cuda") * 2 - 1).to(dtype)
    b = (torch.rand(n, n, device="cuda") * 2 - 1).to(dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    iters, ms = measure(lambda: torch.mm(a, b, out=c))
    del a, b, c
    torch.cuda.empty_cache()
    return iters, 2.0 * n**3 / (ms / 1e3) / 1e12


def copies(nbytes):
    src = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    _, ms = measure(lambda: dst.copy_(src))
    d2d = 2.0 * nbytes / (ms / 1e3) / 1e9
    host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)
    _, ms = measure(lambda: dst.copy_(host, non_blocking=True))
    h2d = nbytes / (ms / 1e3) / 1e9
    _, ms = measure(lambda: host.copy_(src, non_blocking=True))
    d2h = nbytes / (ms / 1e3) / 1e9
    return d2d, h2d, d2h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--device", type=int, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to PyTorch"}))
        return 1
    torch.cuda.set_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(args.device),
        "n": args.size,
        "copy_bytes": args.copy_mib << 20,
        "iterations": {},
    }
    for name, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        iters, tflops = matmul(args.size, dtype)
        out[f"{name}_tflops"] = tflops
        out["iterations"][name] = iters
    d2d, h2d, d2h = copies(args.copy_mib << 20)
    out["d2d_gbps"] = d2d
    out["h2d_pinned_gbps"] = h2d
    out["d2h_pinned_gbps"] = d2h
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
