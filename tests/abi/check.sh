#!/usr/bin/env bash
# check.sh SRCDIR BUILDDIR: compares the ABI of the built libkdispatch-1 with
# the committed baseline (libkdispatch-1.so.0.abi, next to this script), with
# abidiff from Debian's abigail-tools. Only the public headers' types count.
# Fails if a function or variable was removed or changed, a public struct's
# layout included; additions pass (with a note to take a new baseline).
# A deliberate change (a reserved slot of KdStats taken by a new counter,
# say) takes a new baseline in the same commit: tools/abi-baseline.
set -euo pipefail

src=$1
build=$2
here=$(cd "$(dirname "$0")" && pwd)
lib=$(ls "$build"/src/libkdispatch-1.so.0.*.* | head -1)
new=$(mktemp)
trap 'rm -f "$new"' EXIT

# shellcheck source=/dev/null
. "$here/abidw-options"
abidw "${abidw_options[@]}" --headers-dir "$src/include/kdispatch" \
  --headers-dir "$build/include/kdispatch" --out-file "$new" "$lib"

status=0
report=$(abidiff "$here/libkdispatch-1.so.0.abi" "$new") || status=$?
echo "$report"
# Bits 1 and 2: abidiff itself failed.
if (( status & 3 )); then
  echo "abi: abidiff failed ($status)"
  exit 1
fi
removed_or_changed=$(echo "$report" |
  sed -n 's/^\(Functions\|Variables\) changes summary: \([0-9]*\) Removed, \([0-9]*\) Changed.*/\2 \3/p' |
  awk '{ n += $1 + $2 } END { print n + 0 }')
if [ "$removed_or_changed" -gt 0 ]; then
  echo "abi: $removed_or_changed functions or variables removed or changed against the baseline"
  exit 1
fi
if (( status & 4 )); then
  echo "abi: only additions; take a new baseline (tools/abi-baseline) to keep them"
fi
echo "abi: compatible with the baseline"
