/* kd-lru-private.h: an intrusive least-recently-used list, inline
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The key table's dormant mailboxes and an ordered stage's dormant keys
 * wait in one of these for their key's next job, the oldest going first
 * when there are too many. Inline rather than GQueue: a keyed job revives
 * or retires a dormant entry often, and GLib's out-of-line, checked calls
 * cost 4 % more instructions per job in W2 and W3 (callgrind).
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef struct _KdLruLink KdLruLink;

/* Embedded in each entry. */
struct _KdLruLink
{
  KdLruLink *older;
  KdLruLink *newer;
};

/* Not thread-safe: its owner locks. Zero-initialized is empty. */
typedef struct
{
  KdLruLink *oldest;
  KdLruLink *newest;
  guint      length;
} KdLru;

/* The entry of type @type whose member @member is @link. */
#define KD_LRU_ENTRY(link, type, member) \
  ((type *) (void *) ((char *) (link) - G_STRUCT_OFFSET (type, member)))

static inline void
kd_lru_push_newest (KdLru     *lru,
                    KdLruLink *link)
{
  link->newer = NULL;
  link->older = lru->newest;
  if (lru->newest != NULL)
    lru->newest->newer = link;
  else
    lru->oldest = link;
  lru->newest = link;
  lru->length++;
}

static inline void
kd_lru_remove (KdLru     *lru,
               KdLruLink *link)
{
  if (link->older != NULL)
    link->older->newer = link->newer;
  else
    lru->oldest = link->newer;
  if (link->newer != NULL)
    link->newer->older = link->older;
  else
    lru->newest = link->older;
  link->older = link->newer = NULL;
  lru->length--;
}

G_END_DECLS
