#!/usr/bin/env bash
# Every lock in src/ goes through src/kd-sync-private.h's wrappers, which
# tell ThreadSanitizer about each acquire and release: Debian's GLib is not
# built with TSan, so a bare GMutex or GCond call hides an ordering from it
# and TSan reports a race on correct code. Fails, naming the lines, when a
# file of src/ or of a folder in it (src/redis) calls GLib's lock functions
# itself.
#
# usage: sync-wrappers.sh SOURCE-ROOT

set -u

src=$1/src
found=$(grep -rn -E --include='*.c' --include='*.h' \
          '\bg_(mutex_(lock|unlock|trylock)|cond_wait(_until)?|rec_mutex_(lock|unlock)|rw_lock_(reader|writer)_(lock|unlock))[[:space:]]*\(' \
          "$src" | grep -v '/kd-sync-private\.h:')

if [ -n "$found" ]; then
  echo "Bare GLib lock calls in src/; use kd_mutex_lock(), kd_mutex_unlock(),"
  echo "kd_cond_wait() or kd_cond_wait_until() from src/kd-sync-private.h:"
  echo "$found"
  exit 1
fi
echo "src/ locks only through src/kd-sync-private.h"
