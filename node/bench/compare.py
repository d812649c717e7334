#!/usr/bin/env python3
"""Compares `kiln-node benchmark --json` with the PyTorch reference and the
NVML facts Kiln reports with `nvidia-smi --query-gpu` (files written by
node/bench/h100.sh into one directory). Prints a report, writes
summary.json next to the inputs, and exits 0 only if every check passes.

Acceptance: Kiln's BF16 matmul, device copy and pinned host->device
bandwidth are each >= 0.9x PyTorch's for the same sizes; the other figures
are printed for information.
"""
import csv
import json
import os
import sys

THRESHOLD = 0.9


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001 - report any unreadable input
        print(f"cannot read {path}: {e}")
        return None


def smi_rows(path):
    with open(path) as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]]
    return [dict(zip(header, [c.strip() for c in r])) for r in rows[1:] if r]


def number(s):
    try:
        return float(s.split()[0])
    except (ValueError, IndexError):
        return None


def main(out_dir):
    kiln = load(os.path.join(out_dir, "kiln-benchmark.json"))
    torch = load(os.path.join(out_dir, "torch-reference.json"))
    checks = []

    def check(name, ok, detail, required=True):
        checks.append({"name": name, "ok": bool(ok), "required": required, "detail": detail})
        print(f"[{'PASS' if ok else ('FAIL' if required else 'info')}] {name}: {detail}")

    if kiln is None or torch is None or "error" in (torch or {}):
        check("inputs", False, f"kiln={kiln is not None} torch={torch}")
    else:
        gpus = kiln["report"]["gpus"]
        if not gpus:
            check("kiln measured a GPU", False, f"notes: {kiln.get('notes')}")
        else:
            g = gpus[0]
            print(f"kiln: engine {g['engine']}, n={g['matmul_n']}, cuBLAS {kiln.get('cublas_library')}")
            print(f"torch {torch['torch']} (CUDA {torch['cuda']}) on {torch['device']}, n={torch['n']}")
            check("same matmul size", g["matmul_n"] == torch["n"], f"kiln {g['matmul_n']}, torch {torch['n']}")
            check("same copy size", g["copy_bytes"] == torch["copy_bytes"], f"kiln {g['copy_bytes']}, torch {torch['copy_bytes']}")
            pairs = [
                ("bf16 matmul TFLOP/s", g["bf16_gflops"] / 1e3, torch["bf16_tflops"], True),
                ("device copy GB/s", g["d2d_mbps"] / 1e3, torch["d2d_gbps"], True),
                ("pinned host->device GB/s", g["h2d_pinned_mbps"] / 1e3, torch["h2d_pinned_gbps"], True),
                ("fp16 matmul TFLOP/s", g["fp16_gflops"] / 1e3, torch["fp16_tflops"], False),
                ("fp32 matmul TFLOP/s", g["fp32_gflops"] / 1e3, torch["fp32_tflops"], False),
                ("pinned device->host GB/s", g["d2h_pinned_mbps"] / 1e3, torch["d2h_pinned_gbps"], False),
            ]
            for name, k, t, required in pairs:
                ratio = k / t if t else 0.0
                check(f"{name} >= {THRESHOLD}x torch", ratio >= THRESHOLD,
                      f"kiln {k:.1f}, torch {t:.1f}, ratio {ratio:.3f}", required)
            proofs = {p["precision"]: len(p["samples"]) for p in g["proofs"]}
            check("proofs present", all(proofs.get(p, 0) > 0 for p in ("bf16", "fp16", "fp32")) or g["engine"] != "cublas",
                  f"samples per precision {proofs}")
        for n in kiln.get("notes", []):
            print(f"kiln note: {n}")

    # NVML (as Kiln reports it) against nvidia-smi.
    smi_path = os.path.join(out_dir, "nvidia-smi.csv")
    if kiln is not None and os.path.exists(smi_path):
        facts = {g["uuid"]: g for g in kiln.get("gpus", [])}
        for row in smi_rows(smi_path):
            uuid = row.get("uuid", "")
            f = facts.get(uuid)
            if f is None:
                check(f"NVML GPU {uuid}", False, "nvidia-smi lists it, Kiln does not")
                continue
            mig = {"Enabled": True, "Disabled": False}.get(row.get("mig.mode.current", ""), None)
            power = number(row.get("power.limit [W]", ""))
            temp = number(row.get("temperature.gpu", ""))
            mem = number(row.get("memory.total [MiB]", ""))
            cmp = [
                ("name", f["name"], row.get("name")),
                ("memory.total MiB", f["memory_total_bytes"] // (1 << 20), int(mem) if mem is not None else None),
                ("driver_version", f["driver_version"], row.get("driver_version")),
                ("pcie.link.gen.current", f["pcie_link_gen_current"], int(number(row.get("pcie.link.gen.current", "")) or -1)),
                ("pcie.link.width.current", f["pcie_link_width_current"], int(number(row.get("pcie.link.width.current", "")) or -1)),
                ("power.limit W", round((f["power_limit_mw"] or 0) / 1000), round(power) if power is not None else None),
                ("compute_cap", f["compute_capability"], row.get("compute_cap")),
                ("mig.mode.current", f["mig_mode_current"], mig),
            ]
            for name, k, s in cmp:
                check(f"NVML {name} ({uuid[:12]})", k == s, f"kiln {k!r}, nvidia-smi {s!r}")
            kt = f["temperature_c"]
            check(f"NVML temperature ({uuid[:12]})", kt is not None and temp is not None and abs(kt - temp) <= 5,
                  f"kiln {kt}, nvidia-smi {temp} (within 5 C: sampled at different times)")

    doctor = load(os.path.join(out_dir, "kiln-doctor.json"))
    if doctor is not None:
        for c in doctor["checks"]:
            print(f"doctor {c['status']:>4} {c['name']}: {c['detail']}" + (f" | fix: {c['fix']}" if c.get("fix") else ""))
        print(f"doctor exit code {doctor['exit_code']}")

    driver = load(os.path.join(out_dir, "kiln-benchmark-driver.json"))
    if driver is not None:
        dg = driver["report"]["gpus"]
        ok = bool(dg) and dg[0]["engine"] == "driver-kernel" and dg[0]["fp32_gflops"] > 0
        check("driver-only PTX kernel runs and passes its self-check", ok,
              f"{[(g['engine'], g['fp32_gflops']) for g in dg]} notes {driver.get('notes')}", required=False)

    failed = [c for c in checks if c["required"] and not c["ok"]]
    summary = {"pass": not failed, "checks": checks}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("RESULT:", "PASS" if not failed else f"FAIL ({len(failed)} required checks failed)")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")))
