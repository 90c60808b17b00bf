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
 * Keys come from clients, so an attacker may choose them, and a map whose
 * keys share a hash walks one long run on every lookup. kd_key_hash() is
 * SipHash-1-3 keyed with a secret drawn from the kernel's random source when
 * the library loads: without the secret nobody can make keys collide more
 * than chance allows, however well they know the function.
 * kd_key_str_hash() is the same hash for the GHashTables that hold keys
 * from outside (the Redis consumer's producer ids).
 *
 * The map grows at three quarters full and shrinks at one eighth, so a
 * probe stays short and the memory follows the entries. Removal shifts the
 * following entries of the probe run back (no tombstones), so a map in
 * which keys come and go never needs a rehash to clean up.
 */

#include "config.h"

#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include "kd-key-map-private.h"

#define MIN_SLOTS 8

/* The secret key of kd_key_hash(), drawn once per process. */
guint64 kd_key_secret[2];

__attribute__ ((constructor)) static void
draw_secret (void)
{
  guint8 bytes[sizeof kd_key_secret];
  gsize got = 0;
  int fd;

  /* Never blocking: at worst (no getrandom(), no /dev/urandom) a secret
   * that is hard to guess rather than random. */
  if (getrandom (bytes, sizeof bytes, GRND_NONBLOCK) == (gssize) sizeof bytes)
    got = sizeof bytes;
  else if ((fd = open ("/dev/urandom", O_RDONLY | O_CLOEXEC)) >= 0)
    {
      gssize n = read (fd, bytes, sizeof bytes);

      got = n > 0 ? (gsize) n : 0;
      close (fd);
    }
  if (got == sizeof bytes)
    memcpy (kd_key_secret, bytes, sizeof kd_key_secret);
  else
    {
      kd_key_secret[0] = (guint64) g_get_real_time () ^ ((guint64) getpid () << 32) ^ (guint64) (guintptr) &got;
      kd_key_secret[1] = (guint64) g_get_monotonic_time () * 0x9E3779B97F4A7C15u ^ (guint64) (guintptr) bytes;
    }
}

/* kd_key_hash() as a GHashFunc, for tables of strings from outside. */
guint
kd_key_str_hash (gconstpointer string)
{
  gsize length;

  return kd_key_hash (string, &length);
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

/* Forgets every entry, and shrinks back to the smallest size. */
void
kd_key_map_remove_all (KdKeyMap *self)
{
  g_free (self->slots);
  kd_key_map_init (self);
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
