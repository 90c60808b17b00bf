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

guint kd_key_str_hash (gconstpointer  string);

/* The secret key of kd_key_hash() (see kd-key-map.c). */
extern guint64 kd_key_secret[2];

static inline guint64
kd_rotl64 (guint64 x,
           guint   b)
{
  return (x << b) | (x >> (64 - b));
}

/* One round of SipHash over its state @v. */
static inline void
kd_sip_round (guint64 v[4])
{
  v[0] += v[1]; v[1] = kd_rotl64 (v[1], 13); v[1] ^= v[0]; v[0] = kd_rotl64 (v[0], 32);
  v[2] += v[3]; v[3] = kd_rotl64 (v[3], 16); v[3] ^= v[2];
  v[0] += v[3]; v[3] = kd_rotl64 (v[3], 21); v[3] ^= v[0];
  v[2] += v[1]; v[1] = kd_rotl64 (v[1], 17); v[1] ^= v[2]; v[2] = kd_rotl64 (v[2], 32);
}

/* The hash of a key: SipHash-1-3 of its bytes with the secret key, folded
 * to 32 bits, so that every bit of the result depends on every byte (the
 * key table's shards take the high bits, the maps' slots the low ones).
 * Also measures the key, which is copied next. Inline: every keyed submit
 * makes one. */
static inline guint
kd_key_hash (const char *string,
             gsize      *length)
{
  const guchar *p = (const guchar *) string;
  gsize n = strlen (string);
  guint64 v[4] = {
    kd_key_secret[0] ^ 0x736f6d6570736575u,
    kd_key_secret[1] ^ 0x646f72616e646f6du,
    kd_key_secret[0] ^ 0x6c7967656e657261u,
    kd_key_secret[1] ^ 0x7465646279746573u,
  };
  guint64 last = (guint64) n << 56;
  const guchar *end = p + (n & ~(gsize) 7);
  guint64 m;

  for (; p < end; p += 8)
    {
      memcpy (&m, p, 8);
      m = GUINT64_FROM_LE (m);
      v[3] ^= m;
      kd_sip_round (v);
      v[0] ^= m;
    }

  switch (n & 7)
    {
    case 7: last |= (guint64) p[6] << 48; G_GNUC_FALLTHROUGH;
    case 6: last |= (guint64) p[5] << 40; G_GNUC_FALLTHROUGH;
    case 5: last |= (guint64) p[4] << 32; G_GNUC_FALLTHROUGH;
    case 4: last |= (guint64) p[3] << 24; G_GNUC_FALLTHROUGH;
    case 3: last |= (guint64) p[2] << 16; G_GNUC_FALLTHROUGH;
    case 2: last |= (guint64) p[1] << 8; G_GNUC_FALLTHROUGH;
    case 1: last |= (guint64) p[0]; break;
    default: break;
    }

  v[3] ^= last;
  kd_sip_round (v);
  v[0] ^= last;
  v[2] ^= 0xff;
  kd_sip_round (v);
  kd_sip_round (v);
  kd_sip_round (v);
  m = v[0] ^ v[1] ^ v[2] ^ v[3];

  *length = n;
  return (guint) (m ^ (m >> 32));
}

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
