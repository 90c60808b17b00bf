/* test-key-map.c: the key map against a record of what it holds, with colliding hashes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <glib.h>
#include <string.h>

#include "kd-collide.h"
#include "kd-test-util.h"
#include "kd-key-map-private.h"

#define N_KEYS 512

typedef struct
{
  KdKey key;
  char  string[16];
  gint  in_map;
} Entry;

/* Entries whose hashes fall into few slots, so that probe runs are long and
 * wrap around the end of the slot array, and removals have to shift. */
static Entry *
entries_new (guint hash_range)
{
  Entry *entries = g_new0 (Entry, N_KEYS);
  guint i;

  for (i = 0; i < N_KEYS; i++)
    {
      g_snprintf (entries[i].string, sizeof entries[i].string, "key%u", i);
      entries[i].key.string = entries[i].string;
      entries[i].key.length = strlen (entries[i].string);
      /* The low bits (the index) take few values, around 0, so runs start
       * at both ends of the slot array and wrap; the high bits vary. */
      entries[i].key.hash = (((i % hash_range) - hash_range / 2) & 0x00ffffffu) |
                            ((i * 2654435761u) & 0xff000000u);
      if (hash_range == 1)
        entries[i].key.hash = 7;
    }
  return entries;
}

static void
check_all (KdKeyMap *map,
           Entry    *entries)
{
  guint i, size = 0;

  for (i = 0; i < N_KEYS; i++)
    {
      KdKey probe = entries[i].key;   /* equal, not the same pointer */
      gpointer found = kd_key_map_lookup (map, &probe);

      if (entries[i].in_map)
        {
          g_assert_true (found == &entries[i]);
          size++;
        }
      else
        {
          g_assert_null (found);
        }
    }
  g_assert_cmpuint (kd_key_map_size (map), ==, size);
}

static void
run_random (guint hash_range,
            guint seed)
{
  Entry *entries = entries_new (hash_range);
  GRand *rand = g_rand_new_with_seed (seed);
  KdKeyMap map;
  guint step;

  kd_key_map_init (&map);
  for (step = 0; step < 20000; step++)
    {
      /* Phases: mostly inserts, then mostly removals, so the map grows and
       * shrinks several times. */
      gboolean growing = (step / 2500) % 2 == 0;
      Entry *entry = &entries[g_rand_int_range (rand, 0, N_KEYS)];

      if (!entry->in_map && (growing || g_rand_int_range (rand, 0, 4) == 0))
        {
          kd_key_map_insert (&map, &entry->key, entry);
          entry->in_map = TRUE;
        }
      else if (entry->in_map && (!growing || g_rand_int_range (rand, 0, 4) == 0))
        {
          kd_key_map_remove (&map, &entry->key);
          entry->in_map = FALSE;
        }
      if (step % 97 == 0)
        check_all (&map, entries);
    }
  check_all (&map, entries);

  for (step = 0; step < N_KEYS; step++)
    if (entries[step].in_map)
      {
        kd_key_map_remove (&map, &entries[step].key);
        entries[step].in_map = FALSE;
        check_all (&map, entries);
      }
  kd_key_map_clear (&map);

  g_rand_free (rand);
  g_free (entries);
}

/* Hashes spread over every bit. */
static void
test_spread (void)
{
  guint seed;

  for (seed = 1; seed <= 4; seed++)
    run_random (G_MAXUINT32, seed);
}

/* Many keys per home slot: long runs, wrapping, and shifts on removal. */
static void
test_collisions (void)
{
  guint seed;

  for (seed = 1; seed <= 4; seed++)
    {
      run_random (16, seed);
      run_random (3, seed);
    }
}

/* Every key with the same hash: equality decides alone. */
static void
test_one_hash (void)
{
  run_random (1, 1);
}

/* The real hash: equal strings hash alike, and the length counts. */
static void
test_hash (void)
{
  gsize a_length, b_length, c_length;
  guint a = kd_key_hash ("client-17", &a_length);
  guint b = kd_key_hash ("client-17", &b_length);
  guint c = kd_key_hash ("client-71", &c_length);
  KdKey x = { a, a_length, "client-17" };
  KdKey y = { c, c_length, "client-71" };
  KdKey prefix = { a, 6, "client" };

  g_assert_cmpuint (a, ==, b);
  g_assert_cmpuint (a_length, ==, 9);
  g_assert_cmpuint (a, !=, c);
  g_assert_true (kd_key_equal (&x, &x));
  g_assert_false (kd_key_equal (&x, &y));
  g_assert_false (kd_key_equal (&x, &prefix));
}

/* How far a key sits from its home slot: what a lookup of it walks. */
static guint
displacement (const KdKeyMap *map,
              const KdKey    *key)
{
  guint i = key->hash & map->mask, n = 0;

  while (map->slots[i].key != key)
    {
      i = (i + 1) & map->mask;
      n++;
    }
  return n;
}

static void
test_hostile_keys (void)
{
  guint n = kd_test_size (16384, 65536);
  char **keys = kd_collide_keys ("client-", n);
  KdKey *probes = g_new (KdKey, n);
  GHashTable *hashes = g_hash_table_new (g_direct_hash, g_direct_equal);
  guint longest = 0, i;
  KdKeyMap map;

  g_test_summary ("Keys built to share the hash kdispatch used before (FNV-1a multicollisions) "
                  "do share it; under kd_key_hash() they spread like any keys: as many distinct "
                  "hashes as chance allows, and short probe runs in a map holding all of them");

  for (i = 0; i < n; i++)
    g_assert_cmpuint (kd_collide_old_hash (keys[i]), ==, kd_collide_old_hash (keys[0]));

  kd_key_map_init (&map);
  for (i = 0; i < n; i++)
    {
      probes[i].string = keys[i];
      probes[i].hash = kd_key_hash (keys[i], &probes[i].length);
      g_hash_table_add (hashes, GUINT_TO_POINTER (probes[i].hash));
      kd_key_map_insert (&map, &probes[i], keys[i]);
    }
  /* n uniform 32-bit hashes: n^2 / 2^33 equal pairs expected (0.03 for
   * 16,384 keys). */
  g_assert_cmpuint (g_hash_table_size (hashes), >=, n - 4);
  for (i = 0; i < n; i++)
    {
      g_assert_true (kd_key_map_lookup (&map, &probes[i]) == keys[i]);
      longest = MAX (longest, displacement (&map, &probes[i]));
    }
  g_test_message ("%u keys, %u distinct hashes, longest probe %u", n,
                  g_hash_table_size (hashes), longest);
  /* At most half full: a run of 100 has odds far below one in a billion.
   * With the old hash it would be n. */
  g_assert_cmpuint (longest, <, 100);

  for (i = 0; i < n; i++)
    kd_key_map_remove (&map, &probes[i]);
  kd_key_map_clear (&map);
  g_hash_table_unref (hashes);
  g_free (probes);
  g_strfreev (keys);
}

static const char *program;

/* The hash of a key in a new process of this program. */
static char *
hash_in_new_process (void)
{
  const char *argv[] = { program, NULL };
  char *out = NULL;
  GError *error = NULL;
  gint status;
  char **envp = g_environ_setenv (g_get_environ (), "KD_TEST_PRINT_HASH", "client-42", TRUE);

  g_assert_true (g_spawn_sync (NULL, (char **) argv, envp, G_SPAWN_DEFAULT, NULL, NULL, &out, NULL,
                               &status, &error));
  g_assert_no_error (error);
  g_assert_true (g_spawn_check_wait_status (status, NULL));
  g_strfreev (envp);
  return out;
}

static void
test_secret_per_process (void)
{
  g_autofree char *first = hash_in_new_process ();
  g_autofree char *second = hash_in_new_process ();
  g_autofree char *third = hash_in_new_process ();

  g_test_summary ("kd_key_hash() is keyed with a secret drawn per process: new processes hash "
                  "the same key differently");

  g_test_message ("client-42: %s, %s, %s", g_strstrip (first), g_strstrip (second), g_strstrip (third));
  g_assert_cmpuint (strlen (first), >, 0);
  /* Three equal 32-bit values by chance: one in 2^64. */
  g_assert_false (g_str_equal (first, second) && g_str_equal (second, third));
}

int
main (int   argc,
      char *argv[])
{
  gsize length;

  /* hash_in_new_process(): print the key's hash and go. */
  if (g_getenv ("KD_TEST_PRINT_HASH") != NULL)
    {
      g_print ("%u\n", kd_key_hash (g_getenv ("KD_TEST_PRINT_HASH"), &length));
      return 0;
    }
  program = argv[0];

  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/key-map/spread", test_spread);
  g_test_add_func ("/kd/key-map/collisions", test_collisions);
  g_test_add_func ("/kd/key-map/one-hash", test_one_hash);
  g_test_add_func ("/kd/key-map/hash", test_hash);
  g_test_add_func ("/kd/key-map/hostile-keys", test_hostile_keys);
  g_test_add_func ("/kd/key-map/secret-per-process", test_secret_per_process);

  return g_test_run ();
}
