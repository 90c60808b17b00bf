#!/usr/bin/env bash
# probes.sh LIBRARY PROGRAM: the library carries kdispatch's USDT probes
# (readelf -n), and, where this machine lets a tracer attach (bpftrace as
# root, else gdb), they fire with the dispatcher's name and the job's key
# while PROGRAM (traced.c) runs.
set -euo pipefail

lib=$1
program=$2
probes=(job_submit job_start job_end job_retry key_park job_deliver)

notes=$(readelf -n "$lib")
for probe in "${probes[@]}"; do
  if ! grep -A3 'stapsdt' <<<"$notes" | grep -q "Name: $probe\$"; then
    echo "probes: kdispatch:$probe is not in $lib"
    exit 1
  fi
done
echo "probes: all ${#probes[@]} probes are in $(basename "$lib")"

if command -v bpftrace >/dev/null && bpftrace -e 'BEGIN { exit(); }' >/dev/null 2>&1; then
  # Attached to the library's file (not with -c, which looks for the probes
  # before the library is loaded); BEGIN runs once every probe is attached.
  coproc tracer {
    exec bpftrace -q -e "BEGIN { printf(\"attached\n\"); }
      usdt:$lib:kdispatch:job_start /str(arg1) == \"client-3\"/ {
        @starts[str(arg0), str(arg1)] = count(); }" 2>&1
  }
  tracer_pid=$tracer_PID
  while read -r -t 60 line <&"${tracer[0]}"; do
    [ "$line" = attached ] && break
  done
  [ "${line:-}" = attached ] || { echo "probes: bpftrace did not attach"; exit 1; }
  "$program"
  kill -INT "$tracer_pid"
  out=$(cat <&"${tracer[0]}")
  wait "$tracer_pid" || true
  echo "$out"
  grep -q '@starts\[orders, client-3\]: 200$' <<<"$out" ||
    { echo "probes: bpftrace did not see client-3's 200 starts"; exit 1; }
  echo "probes: kdispatch:job_start fired (bpftrace)"
elif command -v gdb >/dev/null; then
  # At main the library is loaded, and its probes can be found.
  out=$(gdb -batch -ex 'break main' -ex run -ex 'break -probe-stap kdispatch:job_start' -ex continue \
          -ex 'printf "probe: %s %s\n", (char *) $_probe_arg0, (char *) $_probe_arg1' -ex kill \
          --args "$program" 2>&1)
  grep -q '^probe: orders client-' <<<"$out" ||
    { echo "$out"; echo "probes: gdb did not stop at kdispatch:job_start"; exit 1; }
  echo "probes: kdispatch:job_start fired (gdb)"
else
  echo "probes: no tracer could attach here: the probes are there, not seen firing"
fi
