#!/usr/bin/env bash
# Instructions per /llm request of the broker with telemetry off, on (every
# trace kept) and sampled at 10%, counted by callgrind: unlike times on a
# shared VM, the counts repeat from run to run, so a change of a few hundred
# instructions per request shows. User-space only (no kernel, no cache
# misses); valgrind counts each step of `rep movsb` and has no SHA
# extensions, so memcpy and SHA-256 weigh more here than on the CPU.
#
#   benches/callgrind.sh            # needs valgrind (apt-get install valgrind)
#
# The load bench's telemetry section runs with those three brokers under
# callgrind; their counters are zeroed once the section has warmed up and
# dumped 8 s later, and each profile is divided by the requests its broker
# finished in that window.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }
bin=$(cargo bench -p lever-benches --bench llm_load --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="llm_load" and m.get("executable"): print(m["executable"])' | tail -1)
tmp=${TMPDIR:-/tmp}
out=$(mktemp -d)
rm -f "$tmp"/lever-callgrind.*
LEVER_BENCH_CALLGRIND=lever-bench-load,otel LEVER_BENCH_ONLY=telemetry "$bin" --quick >"$out/bench.txt" 2>&1 &
bench=$!
for _ in $(seq 1 600); do grep -q "telemetry:" "$out/bench.txt" && break; sleep 0.1; done
sleep 4
for p in $(pgrep -f -- "--tool=callgrind" || true); do callgrind_control -z "$p" >/dev/null 2>&1; done
sleep 8
for p in $(pgrep -f -- "--tool=callgrind" || true); do callgrind_control -d "$p" >/dev/null 2>&1; done
wait "$bench"
python3 - "$tmp" <<'PY'
import collections, glob, re, sys
def profile(path):
    """Self cost per function, and the /llm requests finished (the proxy's
    future dropped once per request)."""
    names, cost, cur, after_call, done = {}, collections.Counter(), None, False, 0
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith("fn="):
                cur = names.get(m.group(1))
            else:
                callee = names.get(m.group(1), "")
            continue
        if line.startswith("calls="):
            after_call = True
            if callee.startswith("core::ptr::drop_in_place<lever_broker::llm::proxy::{{closure}}>"):
                done += int(line.split("=")[1].split()[0])
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2 and not after_call:
                cost[cur] += int(parts[1])
            after_call = False
    return cost, done
runs = {}
for name in ["lever-bench-load", "otel", "otel-sampled"]:
    files = [f for f in glob.glob(f"{sys.argv[1]}/lever-callgrind.{name}*.1")
             if re.fullmatch(rf".*lever-callgrind\.{name}(-\d+)?\.\d+\.1", f)]
    if files:
        runs[name] = profile(files[0])
label = {"lever-bench-load": "off", "otel": "on", "otel-sampled": "sampled"}
per = {label[n]: {k: v / max(d, 1) for k, v in c.items()} for n, (c, d) in runs.items()}
for n, (c, d) in runs.items():
    print(f"{label[n]:>8}: {sum(c.values()) / max(d, 1):9.0f} instructions per request ({d} requests)")
if "on" in per and "off" in per:
    print("\nlargest differences, on - off (per request):")
    keys = set(per["on"]) | set(per["off"])
    diff = sorted(((per["on"].get(k, 0) - per["off"].get(k, 0), k) for k in keys), key=lambda x: -abs(x[0]))
    for d, k in diff[:15]:
        print(f"  {d:8.0f}  {(k or '?')[:100]}")
if "off" in per:
    print("\ntop functions, off (per request):")
    for k, v in sorted(per["off"].items(), key=lambda x: -x[1])[:25]:
        print(f"  {v:8.0f}  {(k or '?')[:100]}")
PY
rm -rf "$out"
printf '\nprofiles (callgrind_annotate FILE): %s\n' "$tmp/lever-callgrind.*"
