/* kd-collide.h: keys that share a hash, as an attacker who knows the hash builds them
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kdispatch once hashed keys with FNV-1a and a fixed finalizer, no secret.
 * FNV-1a's state after a prefix is all that the rest of the key sees, so
 * two blocks that lead from one state to the same state are
 * interchangeable: a birthday search over 4-byte blocks finds such a pair
 * in about 2^16 tries, and n pairs in a row give 2^n keys of 4n bytes with
 * one hash (a multicollision). A keyed hash must spread these keys as it
 * spreads any others; the test of the key map and kd-bench's hostile
 * workload (H1) use them.
 */

#pragma once

#include <glib.h>
#include <string.h>

/* The hash kdispatch used before: FNV-1a, then MurmurHash3's finalizer (a
 * bijection, so equal FNV-1a states give equal hashes). */
static inline guint32
kd_collide_fnv1a (guint32     state,
                  const char *bytes,
                  gsize       length)
{
  gsize i;

  for (i = 0; i < length; i++)
    state = (state ^ (guchar) bytes[i]) * 16777619u;
  return state;
}

static inline guint
kd_collide_old_hash (const char *key)
{
  guint32 h = kd_collide_fnv1a (2166136261u, key, strlen (key));

  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

#define KD_COLLIDE_BLOCK 4

/* A 4-byte block of letters and digits, the @n-th of a sequence that
 * varies every byte (a sequence varying the first bytes only would take
 * far longer to collide: FNV-1a's last bytes change the low bits only). */
static inline void
kd_collide_block (guint32 n,
                  char    block[KD_COLLIDE_BLOCK])
{
  static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  guint i;

  n *= 2654435761u;
  for (i = 0; i < KD_COLLIDE_BLOCK; i++)
    {
      block[i] = alphabet[n % 62];
      n /= 62;
    }
}

/* Two different blocks that take FNV-1a from @state to the same state;
 * returns that state. */
#define KD_COLLIDE_SEEN_BITS 19

static inline guint32
kd_collide_pair (guint32 state,
                 char    a[KD_COLLIDE_BLOCK],
                 char    b[KD_COLLIDE_BLOCK])
{
  /* The states reached so far and the block that reached each: open
   * addressing, n == 0 for an empty slot. A collision is expected after
   * about 2^16 blocks, far below the table's size. */
  guint32 mask = (1u << KD_COLLIDE_SEEN_BITS) - 1;
  struct { guint32 state, n; } *seen = g_malloc0_n (mask + 1, sizeof *seen);
  guint32 n, next = 0;

  for (n = 1; n <= mask / 2; n++)
    {
      char block[KD_COLLIDE_BLOCK];
      guint32 i;

      kd_collide_block (n, block);
      next = kd_collide_fnv1a (state, block, KD_COLLIDE_BLOCK);
      for (i = (next * 2654435761u) >> (32 - KD_COLLIDE_SEEN_BITS); seen[i].n != 0; i = (i + 1) & mask)
        if (seen[i].state == next)
          break;
      if (seen[i].n != 0)
        {
          kd_collide_block (seen[i].n, a);
          if (memcmp (a, block, KD_COLLIDE_BLOCK) == 0)
            continue;   /* the same block again, not a collision */
          memcpy (b, block, KD_COLLIDE_BLOCK);
          break;
        }
      seen[i].state = next;
      seen[i].n = n;
    }
  g_assert (n <= mask / 2);   /* a 32-bit birthday search always ends far sooner */
  g_free (seen);

  return next;
}

/* How many block positions @n_keys colliding keys take: each doubles them. */
static inline guint
kd_collide_n_pairs (guint n_keys)
{
  guint n_pairs = 0;

  while ((1u << n_pairs) < n_keys)
    n_pairs++;
  return n_pairs;
}

/* The length of each of kd_collide_keys (@prefix, @n_keys). */
static inline gsize
kd_collide_key_length (const char *prefix,
                       guint       n_keys)
{
  return strlen (prefix) + (gsize) kd_collide_n_pairs (n_keys) * KD_COLLIDE_BLOCK;
}

/* @n_keys different keys (at most 2^20) that share the old hash: @prefix,
 * then one of two blocks at each of enough positions. Free with
 * g_strfreev(). */
static inline char **
kd_collide_keys (const char *prefix,
                 guint       n_keys)
{
  guint32 state = kd_collide_fnv1a (2166136261u, prefix, strlen (prefix));
  guint n_pairs = kd_collide_n_pairs (n_keys), i, p;
  struct { char block[2][KD_COLLIDE_BLOCK]; } *pairs;
  char **keys;

  g_assert (n_keys > 0 && n_keys <= 1u << 20);
  pairs = g_malloc_n (MAX (n_pairs, 1), sizeof *pairs);
  for (p = 0; p < n_pairs; p++)
    state = kd_collide_pair (state, pairs[p].block[0], pairs[p].block[1]);

  keys = g_new0 (char *, n_keys + 1);
  for (i = 0; i < n_keys; i++)
    {
      GString *key = g_string_new (prefix);

      /* Bit p of i picks the block at position p. */
      for (p = 0; p < n_pairs; p++)
        g_string_append_len (key, pairs[p].block[(i >> p) & 1], KD_COLLIDE_BLOCK);
      keys[i] = g_string_free (key, FALSE);
    }
  g_free (pairs);

  return keys;
}

/* @n_keys random keys of the same shape: @prefix and @length - strlen
 * (@prefix) letters and digits, from @seed. */
static inline char **
kd_collide_random_keys (const char *prefix,
                        guint       n_keys,
                        gsize       length,
                        guint32     seed)
{
  GRand *rand = g_rand_new_with_seed (seed);
  char **keys = g_new0 (char *, n_keys + 1);
  guint i;

  for (i = 0; i < n_keys; i++)
    {
      GString *key = g_string_new (prefix);

      while (key->len < length)
        {
          char block[KD_COLLIDE_BLOCK];

          kd_collide_block (g_rand_int (rand), block);
          g_string_append_len (key, block, MIN (KD_COLLIDE_BLOCK, length - key->len));
        }
      keys[i] = g_string_free (key, FALSE);
    }
  g_rand_free (rand);

  return keys;
}
