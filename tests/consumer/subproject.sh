#!/usr/bin/env bash
# subproject.sh SOURCEDIR: a meson project that uses kdispatch as a
# subproject through dependency('kdispatch-1'), configured, built and run.
set -euo pipefail

source=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
project=$(mktemp -d)
trap 'rm -rf "$project"' EXIT

mkdir -p "$project/subprojects"
ln -s "$source" "$project/subprojects/kdispatch"
cp "$here/consumer.c" "$project/"
cat >"$project/meson.build" <<'MESON'
project('consumer', 'c', default_options: ['c_std=gnu11'])
kdispatch = dependency('kdispatch-1', fallback: ['kdispatch', 'kdispatch_dep'])
executable('consumer', 'consumer.c', dependencies: kdispatch)
MESON

meson setup "$project/build" "$project" --force-fallback-for=kdispatch-1 \
  -Dkdispatch:tests=false -Dkdispatch:examples=false -Dkdispatch:introspection=disabled >/dev/null
ninja -C "$project/build" >/dev/null
"$project/build/consumer"
