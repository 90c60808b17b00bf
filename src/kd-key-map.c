/* kd-key-map.c: a hash map from a key to the entry that holds it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The key table (a key's mailbox) and an ordered stage (a key's release
 * order) each find a key's entry once per job, under a shard lock. A
 * GHashTable did that through two function pointers per probe and an
 * out-of-line call: a fifth of the instructions of a keyed job (callgrind,
 * W2). This map is open addressing with linear probing, inline lookup, and
 * each slot keeping a copy of its key's hash, so a probe reads one array
 * and compares key bytes only when the hashes match.
 *
 * The entry holds its key (a KdKey inside the mailbox or order), so the map
 * stores pointers only and never copies a key. The index is the low bits
 * of the hash (the key table and the reorder pick their shard from the high
 * bits).
 *
 * The map grows at three quarters full and shrinks at one eighth, so a
 * probe stays short and the memory follows the entries. Removal shifts the
 * following entries of the probe run back (no tombstones), so a map in
 * which keys come and go never needs a rehash to clean up.
 */

#include "config.h"

#include "kd-key-map-private.h"

#define MIN_SLOTS 8

/* FNV-1a over the bytes, then MurmurHash3's finalizer so that every bit of
 * the result depends on every byte: the key table picks its shard from the
 * high bits and the map its slot from the low ones. Also measures the key,
 * which is copied next. */
guint
kd_key_hash (const char *string,
             gsize      *length)
{
  const guchar *p = (const guchar *) string;
  guint32 h = 2166136261u;

  for (; *p != '\0'; p++)
    h = (h ^ *p) * 16777619u;
  *length = (gsize) (p - (const guchar *) string);

  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;

  return h;
}

void
kd_key_map_init (KdKeyMap *self)
{
  self->slots = g_new0 (KdKeyMapSlot, MIN_SLOTS);
  self->mask = MIN_SLOTS - 1;
  self->size = 0;
}

/* Once empty. */
void
kd_key_map_clear (KdKeyMap *self)
{
  g_assert (self->size == 0);
  g_clear_pointer (&self->slots, g_free);
}

/* Stores into the first free slot of @hash's run. */
static void
place (KdKeyMapSlot *slots,
       guint         mask,
       guint         hash,
       const KdKey  *key,
       gpointer      entry)
{
  guint i = hash & mask;

  while (slots[i].key != NULL)
    i = (i + 1) & mask;
  slots[i].hash = hash;
  slots[i].key = key;
  slots[i].entry = entry;
}

static void
resize (KdKeyMap *self,
        guint     n_slots)
{
  KdKeyMapSlot *old = self->slots;
  guint n_old = self->mask + 1;
  guint i;

  self->slots = g_new0 (KdKeyMapSlot, n_slots);
  self->mask = n_slots - 1;
  for (i = 0; i < n_old; i++)
    if (old[i].key != NULL)
      place (self->slots, self->mask, old[i].hash, old[i].key, old[i].entry);
  g_free (old);
}

/* @key is not in the map yet; it lives inside @entry. */
void
kd_key_map_insert (KdKeyMap    *self,
                   const KdKey *key,
                   gpointer     entry)
{
  guint n_slots = self->mask + 1;

  if ((self->size + 1) * 4 > n_slots * 3)
    resize (self, n_slots * 2);
  place (self->slots, self->mask, key->hash, key, entry);
  self->size++;
}

/* Whether slot @i may take the entry of slot @j, whose home slot is @home:
 * @home is not cyclically within (i, j]. */
static inline gboolean
may_move_back (guint i,
               guint j,
               guint home)
{
  return i <= j ? (home <= i || home > j) : (home <= i && home > j);
}

/* @key is in the map: the very KdKey it was inserted with. */
void
kd_key_map_remove (KdKeyMap    *self,
                   const KdKey *key)
{
  guint mask = self->mask;
  guint i = key->hash & mask;
  guint j;

  while (self->slots[i].key != key)
    {
      g_assert (self->slots[i].key != NULL);
      i = (i + 1) & mask;
    }

  /* Close the gap: move back every later entry of the run that may sit
   * in it, so no lookup meets an empty slot before its key. */
  for (j = (i + 1) & mask; self->slots[j].key != NULL; j = (j + 1) & mask)
    if (may_move_back (i, j, self->slots[j].hash & mask))
      {
        self->slots[i] = self->slots[j];
        i = j;
      }
  self->slots[i].key = NULL;
  self->size--;

  if (mask + 1 > MIN_SLOTS && self->size * 8 < mask + 1)
    resize (self, (mask + 1) / 2);
}
