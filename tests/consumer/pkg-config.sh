#!/usr/bin/env bash
# pkg-config.sh BUILDDIR: installs the build into a scratch root, then builds
# and runs consumer.c with nothing but `pkg-config kdispatch-1`, as a user
# of the installed library does.
set -euo pipefail

build=$1
here=$(cd "$(dirname "$0")" && pwd)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

meson install -C "$build" --destdir "$root" --no-rebuild --quiet >/dev/null
pc=$(find "$root" -name kdispatch-1.pc | head -1)
[ -n "$pc" ] || { echo "kdispatch-1.pc was not installed"; exit 1; }
# The scratch root stands for the prefix: point the .pc file there (a
# --define-variable would move gio-2.0's prefix too).
prefix=$(pkg-config --variable=prefix "$pc")
mkdir "$root/pc"
sed "s|^prefix=.*|prefix=$root$prefix|" "$pc" >"$root/pc/kdispatch-1.pc"
export PKG_CONFIG_PATH=$root/pc

# shellcheck disable=SC2046
${CC:-cc} -o "$root/consumer" "$here/consumer.c" $(pkg-config --cflags --libs kdispatch-1)
LD_LIBRARY_PATH=$(pkg-config --variable=libdir kdispatch-1) "$root/consumer"
