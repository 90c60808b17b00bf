/* kd-key-map-private.h: keys and a hash map from a key to its entry
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * See kd-key-map.c for the design. The lookup is inline: every keyed
 * submit makes one.
 */

#pragma once

#include <glib.h>
#include <string.h>

G_BEGIN_DECLS

/* What the maps hash and compare: the key and its hash, computed once per
 * submit. Keys are byte strings: no collation, no UTF-8 validation. */
typedef struct
{
  guint       hash;
  gsize       length;
  const char *string;
} KdKey;

guint kd_key_hash     (const char    *string,
                       gsize         *length);
guint kd_key_str_hash (gconstpointer  string);

static inline gboolean
kd_key_equal (const KdKey *a,
              const KdKey *b)
{
  return a->hash == b->hash && a->length == b->length &&
         memcmp (a->string, b->string, a->length) == 0;
}

/* One slot: the entry's key (inside the entry, NULL for an empty slot), a
 * copy of its hash, so a probe compares keys only when the hashes match,
 * and the entry. */
typedef struct
{
  guint        hash;
  const KdKey *key;
  gpointer     entry;
} KdKeyMapSlot;

/* Not thread-safe: its owner locks. */
typedef struct
{
  KdKeyMapSlot *slots;
  guint         mask;    /* number of slots - 1, a power of two minus one */
  guint         size;    /* entries */
} KdKeyMap;

void  kd_key_map_init   (KdKeyMap    *self);
void  kd_key_map_clear  (KdKeyMap    *self);
void  kd_key_map_insert (KdKeyMap    *self,
                         const KdKey *key,
                         gpointer     entry);
void  kd_key_map_remove (KdKeyMap    *self,
                         const KdKey *key);
void  kd_key_map_remove_all (KdKeyMap *self);

static inline guint
kd_key_map_size (const KdKeyMap *self)
{
  return self->size;
}

/* Iterates over the entries, in no order, without changing the map:
 * guint i = 0; gpointer entry; while (kd_key_map_next (map, &i, &entry)) ... */
static inline gboolean
kd_key_map_next (const KdKeyMap *self,
                 guint          *i,
                 gpointer       *entry)
{
  for (; *i <= self->mask; (*i)++)
    if (self->slots[*i].key != NULL)
      {
        *entry = self->slots[(*i)++].entry;
        return TRUE;
      }
  return FALSE;
}

/* The entry of @key, or NULL. */
static inline gpointer
kd_key_map_lookup (const KdKeyMap *self,
                   const KdKey    *key)
{
  guint i = key->hash & self->mask;

  for (;; i = (i + 1) & self->mask)
    {
      const KdKeyMapSlot *slot = &self->slots[i];

      if (slot->key == NULL)
        return NULL;
      if (slot->hash == key->hash && kd_key_equal (slot->key, key))
        return slot->entry;
    }
}

G_END_DECLS
