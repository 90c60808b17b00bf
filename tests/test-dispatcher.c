/* test-dispatcher.c: KdDispatcher's per-key order, its keys and its bound
 *
 * Accounting and shutdown are in test-shutdown.c, delivery on a main
 * context in test-main-loop.c.
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <malloc.h>
#include <string.h>

#include "kd-dispatcher-private.h"
#include "kd-test-util.h"

/* ------------------------------------------------------------------------ */
/* Per-key FIFO, never two jobs of one key at once                          */

typedef struct
{
  guint          n_keys;
  guint          n_jobs;
  char         **keys;
  guint         *job_key;      /* job index → key index */
  guint         *job_seq;      /* job index → sequence number within its key */
  KdTestKeyTurn *turns;        /* per key */
  guint         *submitted;    /* per key: jobs submitted */
  gint           overlaps;
  gint           out_of_order;
  gint           wrong_keys;
  KdTestRecorder recorder;     /* only its done callback's counts */
} OrderCheck;

static gboolean
order_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  OrderCheck *check = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));
  guint key = check->job_key[i];
  guint32 rng = i * 2654435761u + 1;

  if (g_strcmp0 (kd_job_get_key (job), check->keys[key]) != 0)
    g_atomic_int_inc (&check->wrong_keys);

  kd_test_key_turn_take (&check->turns[key], check->job_seq[i], &check->overlaps,
                         &check->out_of_order);
  /* A random job length, so that keys overtake each other. */
  kd_test_spin (kd_test_xorshift (&rng) % 2000);
  kd_test_key_turn_give (&check->turns[key]);
  return TRUE;
}

typedef struct
{
  KdDispatcher *dispatcher;
  OrderCheck   *check;
  guint         parity;  /* this producer submits the keys of this parity */
} OrderProducer;

static gpointer
order_produce (gpointer data)
{
  OrderProducer *producer = data;
  OrderCheck *check = producer->check;
  guint i;

  for (i = 0; i < check->n_jobs; i++)
    {
      GError *error = NULL;

      if (check->job_key[i] % 2 != producer->parity)
        continue;
      g_assert_true (kd_dispatcher_submit (producer->dispatcher, check->keys[check->job_key[i]],
                                           GUINT_TO_POINTER (i), &error));
      g_assert_no_error (error);
    }

  return NULL;
}

static void
test_per_key_order (void)
{
  OrderCheck check = { 0 };
  OrderProducer producers[2];
  GThread *threads[2];
  KdDispatcher *dispatcher;
  GRand *rand = g_rand_new_with_seed (20261121);
  KdStats stats;
  guint i;

  g_test_summary ("Jobs of one key run in submission order and never two at once, "
                  "with 10,000 keys, 8 workers, 2 producers and random job lengths");

  check.n_keys = 10000;
  check.n_jobs = kd_test_size (200000, 2000000);
  check.keys = g_new (char *, check.n_keys);
  check.job_key = g_new (guint, check.n_jobs);
  check.job_seq = g_new (guint, check.n_jobs);
  check.turns = g_new0 (KdTestKeyTurn, check.n_keys);
  check.submitted = g_new0 (guint, check.n_keys);
  kd_test_recorder_init (&check.recorder);

  for (i = 0; i < check.n_keys; i++)
    check.keys[i] = g_strdup_printf ("client-%u", i);
  for (i = 0; i < check.n_jobs; i++)
    {
      guint key = g_rand_int_range (rand, 0, (gint32) check.n_keys);

      check.job_key[i] = key;
      check.job_seq[i] = check.submitted[key]++;
    }

  dispatcher = kd_dispatcher_new (8, order_handler, &check, NULL);
  kd_dispatcher_set_fanout (dispatcher, 2);
  kd_dispatcher_set_done_func (dispatcher, kd_test_recorder_done, &check.recorder, NULL);

  for (i = 0; i < 2; i++)
    {
      producers[i].dispatcher = dispatcher;
      producers[i].check = &check;
      producers[i].parity = i;
      threads[i] = g_thread_new ("producer", order_produce, &producers[i]);
    }
  for (i = 0; i < 2; i++)
    g_thread_join (threads[i]);

  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (check.overlaps, ==, 0);
  g_assert_cmpint (check.out_of_order, ==, 0);
  g_assert_cmpint (check.wrong_keys, ==, 0);
  g_assert_cmpint (check.recorder.completed, ==, check.n_jobs);
  for (i = 0; i < check.n_keys; i++)
    g_assert_cmpuint (check.turns[i].next, ==, check.submitted[i]);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, check.n_jobs);
  g_assert_cmpuint (stats.completed, ==, check.n_jobs);
  g_assert_cmpuint (stats.failed + stats.cancelled + stats.rejected, ==, 0);
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpuint (stats.live_keys, ==, 0);

  g_object_unref (dispatcher);

  for (i = 0; i < check.n_keys; i++)
    g_free (check.keys[i]);
  g_free (check.keys);
  g_free (check.job_key);
  g_free (check.job_seq);
  g_free (check.turns);
  g_free (check.submitted);
  kd_test_recorder_clear (&check.recorder);
  g_rand_free (rand);
}

#define HOT_KEYS 4

typedef struct
{
  KdTestKeyTurn turns[HOT_KEYS];
  gint          overlaps;
  gint          out_of_order;
} FewKeys;

static gboolean
few_keys_handler (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  FewKeys *few = user_data;
  guint i = GPOINTER_TO_UINT (kd_job_get_item (job));
  guint key = i % HOT_KEYS;
  guint32 rng = i * 2654435761u + 7;

  g_assert_cmpint (kd_job_get_key (job)[1] - '0', ==, key);

  /* Each job holds its key's turn for a while: a second job of the key
   * running at the same time, on any worker, finds it taken. */
  kd_test_key_turn_take (&few->turns[key], i / HOT_KEYS, &few->overlaps, &few->out_of_order);
  kd_test_spin (kd_test_xorshift (&rng) % 3000);
  kd_test_key_turn_give (&few->turns[key]);
  return TRUE;
}

static void
test_few_keys_exclusive (void)
{
  FewKeys few = { 0 };
  KdDispatcher *dispatcher;
  guint n_jobs = kd_test_size (40000, 400000);
  guint i;

  g_test_summary ("With 4 hot keys and 8 workers, every worker competes for the same "
                  "keys, and still no two jobs of one key ever overlap or reorder");

  dispatcher = kd_dispatcher_new (8, few_keys_handler, &few, NULL);
  kd_dispatcher_set_fanout (dispatcher, 3);
  for (i = 0; i < n_jobs; i++)
    {
      char key[4] = { 'k', (char) ('0' + i % HOT_KEYS), '\0' };

      g_assert_true (kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (i), NULL));
    }
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (few.overlaps, ==, 0);
  g_assert_cmpint (few.out_of_order, ==, 0);
  for (i = 0; i < HOT_KEYS; i++)
    g_assert_cmpuint (few.turns[i].next, ==, (n_jobs - i + HOT_KEYS - 1) / HOT_KEYS);

  g_object_unref (dispatcher);
}

/* ------------------------------------------------------------------------ */
/* Unkeyed jobs really run in parallel                                      */

typedef struct
{
  GMutex lock;
  GCond  cond;
  guint  arrived;
  guint  expected;
  gint   all_met;   /* handlers that saw every other one running */
} Rendezvous;

static gboolean
rendezvous_handler (KdJob    *job,
                    gpointer  user_data,
                    GError  **error)
{
  Rendezvous *rv = user_data;
  gint64 deadline = g_get_monotonic_time () + KD_TEST_DEADLINE_US;

  /* Blocks until every expected handler is running at the same time. */
  kd_mutex_lock (&rv->lock);
  rv->arrived++;
  g_cond_broadcast (&rv->cond);
  while (rv->arrived < rv->expected && kd_cond_wait_until (&rv->cond, &rv->lock, deadline))
    ;
  if (rv->arrived >= rv->expected)
    rv->all_met++;
  kd_mutex_unlock (&rv->lock);

  return TRUE;
}

static void
check_parallel (guint        n_workers,
                guint        fanout,
                const char  *key_prefix)
{
  Rendezvous rv = { 0 };
  KdDispatcher *dispatcher;
  guint i;

  g_mutex_init (&rv.lock);
  g_cond_init (&rv.cond);
  rv.expected = n_workers;

  dispatcher = kd_dispatcher_new (n_workers, rendezvous_handler, &rv, NULL);
  kd_dispatcher_set_fanout (dispatcher, fanout);
  g_assert_cmpuint (kd_dispatcher_get_fanout (dispatcher), ==, MIN (fanout, n_workers));

  for (i = 0; i < n_workers; i++)
    {
      char *key = key_prefix != NULL ? g_strdup_printf ("%s%u", key_prefix, i) : NULL;

      g_assert_true (kd_dispatcher_submit (dispatcher, key, NULL, NULL));
      g_free (key);
    }
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpint (rv.all_met, ==, n_workers);

  g_object_unref (dispatcher);
  g_mutex_clear (&rv.lock);
  g_cond_clear (&rv.cond);
}

static void
test_unkeyed_parallel (void)
{
  g_test_summary ("With n_workers N, N blocking unkeyed jobs all run at once, for "
                  "every fan-out (including one larger than N, which is clamped)");

  check_parallel (1, 1, NULL);
  check_parallel (4, 1, NULL);
  check_parallel (4, 2, NULL);
  check_parallel (4, 4, NULL);
  check_parallel (5, 2, NULL);
  check_parallel (3, 8, NULL);
  check_parallel (8, 3, NULL);
}

static void
test_keyed_parallel (void)
{
  g_test_summary ("Jobs of N different keys run at once on N workers");

  check_parallel (4, 1, "k");
  check_parallel (6, 3, "k");
}

/* ------------------------------------------------------------------------ */
/* The admission bound                                                      */

typedef struct
{
  KdDispatcher  *dispatcher;
  guint          capacity;
  KdTestCounter  started;
  KdTestCounter  permits;     /* a handler consumes one permit to finish */
  guint          consumed;    /* protected by permits.lock */
  gint           live_items;  /* allocated by the test, not yet freed */
  gint           max_live;
  gint           over_bound;  /* times the exact pending count exceeded the bound */
  gint           freed;
} Bound;

static Bound *bound_for_item_free;

static gpointer
bound_item_new (Bound *bound)
{
  gint live = g_atomic_int_add (&bound->live_items, 1) + 1;
  gint max = g_atomic_int_get (&bound->max_live);

  while (live > max && !g_atomic_int_compare_and_exchange (&bound->max_live, max, live))
    max = g_atomic_int_get (&bound->max_live);

  return g_new0 (guint, 1);
}

static void
bound_item_free (gpointer item)
{
  g_atomic_int_add (&bound_for_item_free->live_items, -1);
  g_atomic_int_inc (&bound_for_item_free->freed);
  g_free (item);
}

static gboolean
bound_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Bound *bound = user_data;
  gint64 deadline = g_get_monotonic_time () + KD_TEST_DEADLINE_US;
  gboolean permitted;

  if (kd_dispatcher_get_admitted (bound->dispatcher) > bound->capacity)
    g_atomic_int_inc (&bound->over_bound);
  kd_test_counter_add (&bound->started, 1);

  /* Finish only when the test hands out a permit. */
  kd_mutex_lock (&bound->permits.lock);
  while (bound->permits.value == bound->consumed &&
         kd_cond_wait_until (&bound->permits.cond, &bound->permits.lock, deadline))
    ;
  permitted = bound->permits.value > bound->consumed;
  if (permitted)
    bound->consumed++;
  kd_mutex_unlock (&bound->permits.lock);

  g_assert_true (permitted);
  return TRUE;
}

static void
bound_init (Bound *bound,
            guint  n_workers,
            guint  capacity)
{
  memset (bound, 0, sizeof *bound);
  kd_test_counter_init (&bound->started);
  kd_test_counter_init (&bound->permits);
  bound->capacity = capacity;
  bound->dispatcher = kd_dispatcher_new (n_workers, bound_handler, bound, NULL);
  kd_dispatcher_set_capacity (bound->dispatcher, capacity);
  kd_dispatcher_set_item_free (bound->dispatcher, bound_item_free);
  bound_for_item_free = bound;
}

static void
bound_clear (Bound *bound)
{
  g_object_unref (bound->dispatcher);
  kd_test_counter_clear (&bound->started);
  kd_test_counter_clear (&bound->permits);
  bound_for_item_free = NULL;
}

typedef struct
{
  Bound    *bound;
  gpointer  item;
  gboolean  forever_timeout;  /* submit_timeout (G_MAXINT64) instead of submit */
  gboolean  accepted;
  GError   *error;
} BlockedSubmit;

static gpointer
blocked_submit_thread (gpointer data)
{
  BlockedSubmit *submit = data;

  if (submit->forever_timeout)
    submit->accepted = kd_dispatcher_submit_timeout (submit->bound->dispatcher, "blocked",
                                                     submit->item, G_MAXINT64, &submit->error);
  else
    submit->accepted = kd_dispatcher_submit (submit->bound->dispatcher, "blocked",
                                             submit->item, &submit->error);
  return NULL;
}

static void
test_bound (void)
{
  Bound bound;
  BlockedSubmit blocked = { 0 };
  GThread *thread;
  GError *error = NULL;
  gpointer refused;
  KdStats stats;
  guint i;

  g_test_summary ("Never more than capacity jobs pending: submit blocks until a job "
                  "ends, try_submit fails with FULL, submit_timeout with TIMEOUT (and waits "
                  "like submit for a timeout past the end of time), and a refused item "
                  "stays the caller's");

  bound_init (&bound, 2, 8);

  for (i = 0; i < 8; i++)
    {
      char key[8];

      g_snprintf (key, sizeof key, "k%u", i % 3);
      g_assert_true (kd_dispatcher_try_submit (bound.dispatcher, i < 6 ? key : NULL,
                                               bound_item_new (&bound), &error));
      g_assert_no_error (error);
    }
  g_assert_true (kd_test_counter_wait (&bound.started, 2));
  g_assert_cmpuint (kd_dispatcher_get_admitted (bound.dispatcher), ==, 8);

  refused = bound_item_new (&bound);
  g_assert_false (kd_dispatcher_try_submit (bound.dispatcher, "k0", refused, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  g_assert_false (kd_dispatcher_try_submit (bound.dispatcher, NULL, refused, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_FULL);
  g_clear_error (&error);

  g_assert_false (kd_dispatcher_submit_timeout (bound.dispatcher, "k1", refused, 2000, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);

  g_assert_false (kd_dispatcher_submit_timeout (bound.dispatcher, NULL, refused, 0, &error));
  g_assert_error (error, KD_ERROR, KD_ERROR_TIMEOUT);
  g_clear_error (&error);

  /* Nothing ran or freed the refused item. */
  g_assert_cmpint (g_atomic_int_get (&bound.freed), ==, 0);
  kd_dispatcher_get_stats (bound.dispatcher, &stats);
  g_assert_cmpuint (stats.rejected, ==, 4);
  g_assert_cmpuint (stats.submitted, ==, 8);
  g_assert_cmpuint (stats.pending, ==, 8);

  /* A timeout past the end of time waits like submit... */
  blocked.bound = &bound;
  blocked.item = refused;
  blocked.forever_timeout = TRUE;
  thread = g_thread_new ("blocked-submit", blocked_submit_thread, &blocked);
  kd_dispatcher_wait_blocked_submitters (bound.dispatcher, 1);
  kd_test_counter_add (&bound.permits, 1);
  g_thread_join (thread);
  g_assert_true (blocked.accepted);
  g_assert_no_error (blocked.error);
  refused = bound_item_new (&bound);
  blocked.forever_timeout = FALSE;

  /* A blocking submit sleeps while the bound is reached... */
  blocked.bound = &bound;
  blocked.item = refused;
  thread = g_thread_new ("blocked-submit", blocked_submit_thread, &blocked);
  kd_dispatcher_wait_blocked_submitters (bound.dispatcher, 1);
  g_assert_cmpuint (kd_dispatcher_get_admitted (bound.dispatcher), ==, 8);

  /* ...and is admitted as soon as one job ends. */
  kd_test_counter_add (&bound.permits, 1);
  g_thread_join (thread);
  g_assert_true (blocked.accepted);
  g_assert_no_error (blocked.error);
  g_assert_cmpuint (kd_dispatcher_get_admitted (bound.dispatcher), <=, 8);

  kd_test_counter_add (&bound.permits, 1000);
  kd_dispatcher_wait (bound.dispatcher);

  kd_dispatcher_get_stats (bound.dispatcher, &stats);
  g_assert_cmpuint (stats.submitted, ==, 10);
  g_assert_cmpuint (stats.completed, ==, 10);
  g_assert_cmpuint (stats.pending, ==, 0);
  g_assert_cmpint (bound.freed, ==, 10);
  g_assert_cmpint (bound.live_items, ==, 0);
  g_assert_cmpint (bound.over_bound, ==, 0);

  bound_clear (&bound);
}

static void
test_bound_small_gap (void)
{
  Bound bound;
  BlockedSubmit blocked = { 0 };
  GThread *thread;
  guint i;

  g_test_summary ("With a large bound, a blocked submit is admitted even when only "
                  "one slot frees and every other job waits for that submitter");

  bound_init (&bound, 64, 64);
  for (i = 0; i < 64; i++)
    g_assert_true (kd_dispatcher_submit (bound.dispatcher, NULL, bound_item_new (&bound), NULL));
  g_assert_true (kd_test_counter_wait (&bound.started, 64));

  blocked.bound = &bound;
  blocked.item = bound_item_new (&bound);
  thread = g_thread_new ("blocked-submit", blocked_submit_thread, &blocked);
  kd_dispatcher_wait_blocked_submitters (bound.dispatcher, 1);

  /* One slot frees; the other 63 handlers hold theirs until the blocked
   * submit returned. */
  kd_test_counter_add (&bound.permits, 1);
  g_thread_join (thread);
  g_assert_true (blocked.accepted);
  g_assert_no_error (blocked.error);

  kd_test_counter_add (&bound.permits, 1000);
  kd_dispatcher_wait (bound.dispatcher);
  g_assert_cmpint (bound.freed, ==, 65);
  g_assert_cmpint (bound.over_bound, ==, 0);
  bound_clear (&bound);
}

typedef struct
{
  gint  live;
  gint  max_live;
  gint  over_bound;
  guint capacity;
  KdDispatcher *dispatcher;
} Flood;

static Flood *flood_for_item_free;

static void
flood_item_free (gpointer item)
{
  g_atomic_int_add (&flood_for_item_free->live, -1);
  g_free (item);
}

static gboolean
slow_handler (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  Flood *flood = user_data;

  if (kd_dispatcher_get_admitted (flood->dispatcher) > flood->capacity)
    g_atomic_int_inc (&flood->over_bound);
  kd_test_spin (20000);
  return TRUE;
}

static void
test_bound_flat_memory (void)
{
  Flood flood = { 0 };
  guint n_jobs;
  guint i;
  struct mallinfo2 before, after;

  g_test_summary ("A producer that outruns the workers by far keeps memory flat: "
                  "at most capacity items exist beyond the one in the producer's hand");

  flood.capacity = 16;
  n_jobs = 100 * flood.capacity;
  flood_for_item_free = &flood;
  flood.dispatcher = kd_dispatcher_new (1, slow_handler, &flood, NULL);
  kd_dispatcher_set_capacity (flood.dispatcher, flood.capacity);
  kd_dispatcher_set_item_free (flood.dispatcher, flood_item_free);

  before = mallinfo2 ();
  for (i = 0; i < n_jobs; i++)
    {
      gint live = g_atomic_int_add (&flood.live, 1) + 1;

      flood.max_live = MAX (flood.max_live, live);
      g_assert_true (kd_dispatcher_submit (flood.dispatcher, (i % 2) ? "k" : NULL,
                                           g_malloc (1024), NULL));
    }
  after = mallinfo2 ();
  kd_dispatcher_wait (flood.dispatcher);

  /* The item being submitted is counted before its submit is admitted. */
  g_assert_cmpint (flood.max_live, <=, (gint) flood.capacity + 1);
  g_assert_cmpint (flood.over_bound, ==, 0);
  g_assert_cmpint (flood.live, ==, 0);

  /* With glibc's allocator, the heap in use grew by less than the 1600 KiB
   * the items would take if the queue were unbounded. */
  if (before.uordblks != 0)
    g_assert_cmpuint (after.uordblks, <, before.uordblks + 256 * 1024);

  g_object_unref (flood.dispatcher);
  flood_for_item_free = NULL;
}

/* ------------------------------------------------------------------------ */
/* A million distinct keys                                                  */

typedef struct
{
  guint    n_workers;
  guint    threads_before;
  gint     max_threads;
  gint     ran;
} ManyKeys;

static gboolean
many_keys_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  ManyKeys *many = user_data;
  gint ran = g_atomic_int_add (&many->ran, 1);

  /* Sample the thread count now and then: it must not follow the keys. */
  if (ran % 50000 == 0)
    {
      gint threads = (gint) kd_test_count_threads ();
      gint max = g_atomic_int_get (&many->max_threads);

      while (threads > max &&
             !g_atomic_int_compare_and_exchange (&many->max_threads, max, threads))
        max = g_atomic_int_get (&many->max_threads);
    }
  return TRUE;
}

static void
test_many_keys (void)
{
  ManyKeys many = { 0 };
  KdDispatcher *dispatcher;
  guint n_keys = kd_test_size (1000000, 4000000);
  struct mallinfo2 before, after;
  char key[32];
  KdStats stats;
  guint i;

  g_test_summary ("1,000,000 distinct keys: the thread count does not follow the "
                  "keys, and after wait live_keys is 0 and the memory is given back");

  many.n_workers = 4;
  many.threads_before = kd_test_threads_settle (0);
  dispatcher = kd_dispatcher_new (many.n_workers, many_keys_handler, &many, NULL);

  /* Warm up so that the baseline includes the workers and allocator caches. */
  g_assert_true (kd_dispatcher_submit (dispatcher, "warm-up", NULL, NULL));
  kd_dispatcher_wait (dispatcher);
  malloc_trim (0);
  before = mallinfo2 ();

  for (i = 0; i < n_keys; i++)
    {
      /* The buffer is reused at once: keys are copied at submit. */
      g_snprintf (key, sizeof key, "client-%u", i);
      g_assert_true (kd_dispatcher_submit (dispatcher, key, NULL, NULL));
    }
  kd_dispatcher_wait (dispatcher);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.live_keys, ==, 0);
  g_assert_cmpuint (stats.completed, ==, n_keys + 1);
  g_assert_cmpint (many.ran, ==, n_keys + 1);
  g_assert_cmpint (many.max_threads, <=, (gint) (many.threads_before + many.n_workers));

  malloc_trim (0);
  after = mallinfo2 ();
  /* A mailbox takes about 100 bytes: keeping them would hold ~100 MB. */
  if (before.uordblks != 0)
    g_assert_cmpuint (after.uordblks, <, before.uordblks + 1024 * 1024);
  else
    g_test_message ("no heap statistics under this allocator; live_keys checked only");

  g_object_unref (dispatcher);
}

/* ------------------------------------------------------------------------ */
/* A worker submitting to its own dispatcher                                */

typedef struct
{
  KdDispatcher *dispatcher;
  KdTestGate    hold;       /* holds the second job until the first finished */
  gint          hold_timeouts;
  gboolean      accepted[3];
  GError       *errors[3];
  gint          inner_ran;
} SelfSubmit;

static gboolean
self_submit_handler (KdJob    *job,
                     gpointer  user_data,
                     GError  **error)
{
  SelfSubmit *self_submit = user_data;
  const char *what = kd_job_get_item (job);

  if (g_str_equal (what, "submitter"))
    {
      /* The dispatcher is full (this job and the held one): a worker must
       * not wait for room that only workers can make. */
      self_submit->accepted[0] = kd_dispatcher_submit (self_submit->dispatcher, "x", "inner",
                                                       &self_submit->errors[0]);
      self_submit->accepted[1] = kd_dispatcher_submit_timeout (self_submit->dispatcher, NULL,
                                                               "inner", G_TIME_SPAN_HOUR,
                                                               &self_submit->errors[1]);
      self_submit->accepted[2] = kd_dispatcher_try_submit (self_submit->dispatcher, NULL,
                                                           "inner", &self_submit->errors[2]);
      kd_test_gate_open (&self_submit->hold);
    }
  else if (g_str_equal (what, "held"))
    {
      if (!kd_test_gate_wait_for (&self_submit->hold, 10 * G_TIME_SPAN_SECOND))
        g_atomic_int_inc (&self_submit->hold_timeouts);
    }
  else
    {
      g_atomic_int_inc (&self_submit->inner_ran);
    }

  return TRUE;
}

static void
test_submit_from_worker (void)
{
  SelfSubmit self_submit = { 0 };
  guint i;

  g_test_summary ("A submit from one of the dispatcher's own workers never deadlocks "
                  "when the bound is reached: it fails with KD_ERROR_FULL at once");

  kd_test_gate_init (&self_submit.hold);
  self_submit.dispatcher = kd_dispatcher_new (2, self_submit_handler, &self_submit, NULL);
  kd_dispatcher_set_capacity (self_submit.dispatcher, 2);

  g_assert_true (kd_dispatcher_submit (self_submit.dispatcher, NULL, "held", NULL));
  g_assert_true (kd_dispatcher_submit (self_submit.dispatcher, NULL, "submitter", NULL));
  kd_dispatcher_wait (self_submit.dispatcher);

  g_assert_cmpint (self_submit.hold_timeouts, ==, 0);
  for (i = 0; i < 3; i++)
    {
      g_assert_false (self_submit.accepted[i]);
      g_assert_error (self_submit.errors[i], KD_ERROR, KD_ERROR_FULL);
      g_clear_error (&self_submit.errors[i]);
    }
  g_assert_cmpint (self_submit.inner_ran, ==, 0);

  g_object_unref (self_submit.dispatcher);
  kd_test_gate_clear (&self_submit.hold);
}

typedef struct
{
  KdDispatcher *dispatcher;
  gint          depth_ran;
} Chain;

static gboolean
chain_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  Chain *chain = user_data;
  guint depth = GPOINTER_TO_UINT (kd_job_get_item (job));

  g_atomic_int_inc (&chain->depth_ran);
  if (depth < 100)
    {
      GError *local_error = NULL;

      g_assert_true (kd_dispatcher_submit (chain->dispatcher, kd_job_get_key (job),
                                           GUINT_TO_POINTER (depth + 1), &local_error));
      g_assert_no_error (local_error);
    }
  return TRUE;
}

static void
test_submit_from_worker_room (void)
{
  Chain chain = { 0 };

  g_test_summary ("A worker may submit to its own dispatcher while there is room");

  chain.dispatcher = kd_dispatcher_new (2, chain_handler, &chain, NULL);
  kd_dispatcher_set_capacity (chain.dispatcher, 4);
  g_assert_true (kd_dispatcher_submit (chain.dispatcher, "chain", GUINT_TO_POINTER (1), NULL));
  g_assert_true (kd_dispatcher_submit (chain.dispatcher, NULL, GUINT_TO_POINTER (1), NULL));

  /* Each job submits the next before it ends; wait until both chains ran. */
  while (g_atomic_int_get (&chain.depth_ran) < 200)
    kd_dispatcher_wait (chain.dispatcher);
  g_assert_cmpint (chain.depth_ran, ==, 200);

  g_object_unref (chain.dispatcher);
}

/* ------------------------------------------------------------------------ */
/* A hot key does not starve the others                                     */

typedef struct
{
  KdDispatcher *dispatcher;
  KdTestGate    cycling;    /* opened once the hot key has run a while */
  KdTestGate    cold_in;    /* opened once the cold jobs were submitted */
  gint          cold_ran;
  gint          hot_ran;
} Hot;

#define HOT_LIMIT 100000

static gboolean
hot_handler (KdJob    *job,
             gpointer  user_data,
             GError  **error)
{
  Hot *hot = user_data;
  gint ran;

  if (g_strcmp0 (kd_job_get_key (job), "hot") != 0)
    {
      g_atomic_int_inc (&hot->cold_ran);
      return TRUE;
    }

  /* Each hot job queues the next one, so the key never runs dry until the
   * cold jobs got their turn (or the limit says they never will). */
  /* Hold the hot key mid-cycle until the cold jobs are queued, whatever
   * the scheduling (valgrind runs one thread at a time). */
  ran = g_atomic_int_add (&hot->hot_ran, 1);
  if (ran == 1000)
    {
      kd_test_gate_open (&hot->cycling);
      g_assert_true (kd_test_gate_wait (&hot->cold_in));
    }
  if (ran < HOT_LIMIT && g_atomic_int_get (&hot->cold_ran) < 2)
    g_assert_true (kd_dispatcher_submit (hot->dispatcher, "hot", NULL, NULL));
  return TRUE;
}

static void
test_hot_key_fairness (void)
{
  Hot hot = { 0 };
  guint i;

  g_test_summary ("A key that never runs dry does not starve other keys or unkeyed "
                  "jobs, even on a single worker");

  kd_test_gate_init (&hot.cycling);
  kd_test_gate_init (&hot.cold_in);
  hot.dispatcher = kd_dispatcher_new (1, hot_handler, &hot, NULL);
  for (i = 0; i < 100; i++)
    g_assert_true (kd_dispatcher_submit (hot.dispatcher, "hot", NULL, NULL));

  /* The cold jobs arrive while the hot key is already going round. */
  g_assert_true (kd_test_gate_wait (&hot.cycling));
  g_assert_true (kd_dispatcher_submit (hot.dispatcher, "cold", NULL, NULL));
  g_assert_true (kd_dispatcher_submit (hot.dispatcher, NULL, NULL, NULL));
  kd_test_gate_open (&hot.cold_in);

  /* The hot jobs keep submitting more until the cold ones ran. */
  while (g_atomic_int_get (&hot.cold_ran) < 2 && g_atomic_int_get (&hot.hot_ran) < HOT_LIMIT)
    kd_dispatcher_wait (hot.dispatcher);
  kd_dispatcher_wait (hot.dispatcher);

  g_assert_cmpint (hot.cold_ran, ==, 2);
  g_assert_cmpint (hot.hot_ran, <, HOT_LIMIT);

  g_object_unref (hot.dispatcher);
  kd_test_gate_clear (&hot.cycling);
  kd_test_gate_clear (&hot.cold_in);
}

/* ------------------------------------------------------------------------ */
/* A task queued in a busy group is not starved by fresh input              */

enum { STARVE_HOLD_1, STARVE_HOLD_2, STARVE_A, STARVE_B, STARVE_FEED };

#define STARVE_FEED_LIMIT 50000

typedef struct
{
  KdDispatcher *dispatcher;
  KdTestGate    release_1;     /* lets the first holding job end */
  KdTestGate    release_2;
  KdTestHold    holds;         /* both workers busy */
  KdTestGate    a_running;
  KdTestGate    b_ran;
  gint          fed;
  gint          fed_when_b_ran;
} Starve;

static gboolean
starve_handler (KdJob    *job,
                gpointer  user_data,
                GError  **error)
{
  Starve *st = user_data;
  gint fed;

  switch (GPOINTER_TO_INT (kd_job_get_item (job)))
    {
    case STARVE_HOLD_1:
      kd_test_counter_add (&st->holds.arrived, 1);
      g_assert_true (kd_test_gate_wait (&st->release_1));
      break;
    case STARVE_HOLD_2:
      kd_test_counter_add (&st->holds.arrived, 1);
      g_assert_true (kd_test_gate_wait (&st->release_2));
      break;
    case STARVE_A:
      /* Holds its worker until B ran: B waits in this worker's group. */
      kd_test_gate_open (&st->a_running);
      g_assert_true (kd_test_gate_wait (&st->b_ran));
      break;
    case STARVE_B:
      g_atomic_int_set (&st->fed_when_b_ran, g_atomic_int_get (&st->fed));
      kd_test_gate_open (&st->b_ran);
      break;
    case STARVE_FEED:
      /* Fresh input, forever, until B ran (or the limit says it never will). */
      fed = g_atomic_int_add (&st->fed, 1);
      if (fed < STARVE_FEED_LIMIT && !kd_test_gate_wait_for (&st->b_ran, 0))
        {
          char key[32];

          g_snprintf (key, sizeof key, "feed-%d", fed);
          g_assert_true (kd_dispatcher_submit (st->dispatcher, key,
                                               GINT_TO_POINTER (STARVE_FEED), NULL));
        }
      break;
    default:
      g_assert_not_reached ();
    }

  return TRUE;
}

static void
test_no_starvation_across_groups (void)
{
  Starve st = { 0 };

  g_test_summary ("With two groups, a task left in a busy group's queue is taken by "
                  "the other group's idle worker even while fresh input keeps coming");

  kd_test_gate_init (&st.release_1);
  kd_test_gate_init (&st.release_2);
  kd_test_hold_init (&st.holds);
  kd_test_gate_init (&st.a_running);
  kd_test_gate_init (&st.b_ran);
  st.dispatcher = kd_dispatcher_new (2, starve_handler, &st, NULL);
  kd_dispatcher_set_fanout (st.dispatcher, 2);
  kd_dispatcher_set_capacity (st.dispatcher, 1 << 20);

  /* Both workers busy, so A and B wait in the input together. */
  g_assert_true (kd_dispatcher_submit (st.dispatcher, NULL, GINT_TO_POINTER (STARVE_HOLD_1), NULL));
  g_assert_true (kd_dispatcher_submit (st.dispatcher, NULL, GINT_TO_POINTER (STARVE_HOLD_2), NULL));
  g_assert_true (kd_test_hold_wait_arrived (&st.holds, 2));
  /* Keyed, each its own key: a ready key is a task of the input queue and
   * the groups' (plain unkeyed jobs travel in the ring of values, which
   * every worker takes from directly). */
  g_assert_true (kd_dispatcher_submit (st.dispatcher, "a", GINT_TO_POINTER (STARVE_A), NULL));
  g_assert_true (kd_dispatcher_submit (st.dispatcher, "b", GINT_TO_POINTER (STARVE_B), NULL));

  /* One worker comes free and takes A and B into its group; A runs and
   * holds it, B waits in that group's queue. */
  kd_test_gate_open (&st.release_2);
  g_assert_true (kd_test_gate_wait (&st.a_running));

  /* Fresh input keeps coming; only then does the other worker come free. */
  g_assert_true (kd_dispatcher_submit (st.dispatcher, "feed", GINT_TO_POINTER (STARVE_FEED), NULL));
  kd_test_gate_open (&st.release_1);

  g_assert_true (kd_test_gate_wait (&st.b_ran));
  kd_dispatcher_wait (st.dispatcher);
  g_assert_cmpint (st.fed_when_b_ran, <, STARVE_FEED_LIMIT);

  g_object_unref (st.dispatcher);
  kd_test_gate_clear (&st.release_1);
  kd_test_gate_clear (&st.release_2);
  kd_test_hold_clear (&st.holds);
  kd_test_gate_clear (&st.a_running);
  kd_test_gate_clear (&st.b_ran);
}

/* ------------------------------------------------------------------------ */
/* Plain unkeyed jobs travel in the ring of values                          */

#define RING_HOLDER GUINT_TO_POINTER (G_MAXUINT)

/* More unkeyed jobs waiting than the ring of values holds (as many as the
 * bound, up to 16,384): the rest wait as records in the input queue, and
 * every one runs exactly once. */
static void
test_unkeyed_beyond_ring (void)
{
  const guint n_jobs = 20000, n_singles = 10000;
  KdTestRecorder recorder;
  KdDispatcher *dispatcher;
  guint8 *seen = g_new0 (guint8, n_jobs);
  gpointer *batch = g_new (gpointer, n_jobs - n_singles);
  KdStats stats;
  guint i;

  g_test_summary ("More waiting unkeyed jobs than the ring of values holds, submitted "
                  "one by one and in a batch, are all accepted without blocking, and "
                  "each runs exactly once");

  kd_test_recorder_init (&recorder);
  recorder.hold_only = RING_HOLDER;
  dispatcher = kd_dispatcher_new (1, kd_test_recorder_handler, &recorder, NULL);
  kd_dispatcher_set_capacity (dispatcher, 2 * n_jobs);

  /* The only worker is held, so every job below waits. */
  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, RING_HOLDER, NULL));
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 1));
  /* One by one, then a batch that fills the rest of the ring and goes on
   * as records. */
  for (i = 0; i < n_singles; i++)
    g_assert_true (kd_dispatcher_try_submit (dispatcher, NULL, GUINT_TO_POINTER (i), NULL));
  for (i = n_singles; i < n_jobs; i++)
    batch[i - n_singles] = GUINT_TO_POINTER (i);
  g_assert_cmpuint (kd_dispatcher_try_submit_many (dispatcher, NULL, batch, n_jobs - n_singles, NULL),
                    ==, n_jobs - n_singles);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.pending, ==, n_jobs + 1);

  kd_test_hold_release (&recorder.hold);
  g_assert_true (kd_dispatcher_wait_until (dispatcher, g_get_monotonic_time () + KD_TEST_DEADLINE_US));

  g_assert_cmpuint (recorder.items->len, ==, n_jobs + 1);
  for (i = 0; i < recorder.items->len; i++)
    {
      gpointer item = g_ptr_array_index (recorder.items, i);

      if (item != RING_HOLDER)
        seen[GPOINTER_TO_UINT (item)]++;
    }
  for (i = 0; i < n_jobs; i++)
    g_assert_cmpuint (seen[i], ==, 1);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, n_jobs + 1);
  g_assert_cmpuint (stats.pending, ==, 0);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
  g_free (seen);
  g_free (batch);
}

/* Plain unkeyed jobs behind many ready keys, each with more jobs than a
 * worker runs of a key at a time: the worker takes a value and a task in
 * turn, so each unkeyed job waits for one key's batch at most. */
static void
test_unkeyed_not_behind_keys (void)
{
  const guint n_keys = 50, n_per_key = 200, n_unkeyed = 5;
  KdTestRecorder recorder;
  KdDispatcher *dispatcher;
  guint i, j, keyed_before_last = 0;
  guint unkeyed_seen = 0;

  g_test_summary ("A worker takes plain unkeyed jobs and ready keys in turn: unkeyed jobs "
                  "do not wait behind every key's jobs submitted before them");

  kd_test_recorder_init (&recorder);
  recorder.hold_only = RING_HOLDER;
  dispatcher = kd_dispatcher_new (1, kd_test_recorder_handler, &recorder, NULL);
  kd_dispatcher_set_capacity (dispatcher, n_keys * n_per_key + n_unkeyed + 1);

  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, RING_HOLDER, NULL));
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 1));
  for (j = 0; j < n_per_key; j++)
    for (i = 0; i < n_keys; i++)
      {
        char key[16];

        g_snprintf (key, sizeof key, "k%u", i);
        g_assert_true (kd_dispatcher_submit (dispatcher, key, GUINT_TO_POINTER (j), NULL));
      }
  for (i = 0; i < n_unkeyed; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (i), NULL));

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpuint (recorder.items->len, ==, n_keys * n_per_key + n_unkeyed + 1);
  for (i = 1; i < recorder.items->len && unkeyed_seen < n_unkeyed; i++)
    {
      if (g_ptr_array_index (recorder.keys, i) == NULL)
        unkeyed_seen++;
      else
        keyed_before_last++;
    }
  /* A key's batch is at most 64 jobs (MAILBOX_BUDGET). */
  g_assert_cmpuint (keyed_before_last, <=, n_unkeyed * 64);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

/* A keyed job (a task of the input queue) behind a ring full of unkeyed
 * jobs: the worker takes from the two in turn, so it runs second. */
static void
test_unkeyed_and_keyed_take_turns (void)
{
  const guint n_unkeyed = 500;
  KdTestRecorder recorder;
  KdDispatcher *dispatcher;
  g_autoptr (GPtrArray) keyed = NULL;
  guint i, position = 0;

  g_test_summary ("A worker takes plain unkeyed jobs and ready keys in turn: a keyed "
                  "job does not wait behind every unkeyed job submitted before it");

  kd_test_recorder_init (&recorder);
  recorder.hold_only = RING_HOLDER;
  dispatcher = kd_dispatcher_new (1, kd_test_recorder_handler, &recorder, NULL);

  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, RING_HOLDER, NULL));
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, 1));
  for (i = 0; i < n_unkeyed; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, NULL, GUINT_TO_POINTER (i), NULL));
  g_assert_true (kd_dispatcher_submit (dispatcher, "k", GUINT_TO_POINTER (n_unkeyed), NULL));

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpuint (recorder.items->len, ==, n_unkeyed + 2);
  while (g_ptr_array_index (recorder.items, position) != GUINT_TO_POINTER (n_unkeyed))
    position++;
  /* The holder ran first; then one unkeyed job at most. */
  g_assert_cmpuint (position, <=, 2);
  keyed = kd_test_recorder_items_of (&recorder, "k");
  g_assert_cmpuint (keyed->len, ==, 1);

  g_object_unref (dispatcher);
  kd_test_recorder_clear (&recorder);
}

/* ------------------------------------------------------------------------ */
/* Bad input                                                                */

static void
test_bad_input_preconditions (void)
{
  KdDispatcher *dispatcher;
  gint item = 0;
  KdStats stats;

  g_test_summary ("NULL self or handler, capacity 0, fan-out 0 and configuration "
                  "after the first submit are criticals, and the setting is ignored");

  if (!g_test_undefined ())
    return;

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*handler != NULL*");
  g_assert_null (kd_dispatcher_new (1, NULL, NULL, NULL));
  g_test_assert_expected_messages ();

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*KD_IS_DISPATCHER*");
  g_assert_false (kd_dispatcher_submit (NULL, "k", &item, NULL));
  g_test_assert_expected_messages ();

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*KD_IS_DISPATCHER*");
  g_assert_false (kd_dispatcher_try_submit (NULL, NULL, &item, NULL));
  g_test_assert_expected_messages ();

  dispatcher = kd_dispatcher_new (1, kd_test_noop_handler, NULL, NULL);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*capacity > 0*");
  kd_dispatcher_set_capacity (dispatcher, 0);
  g_test_assert_expected_messages ();
  g_assert_cmpuint (kd_dispatcher_get_capacity (dispatcher), ==, 1024);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*n_groups > 0*");
  kd_dispatcher_set_fanout (dispatcher, 0);
  g_test_assert_expected_messages ();
  g_assert_cmpuint (kd_dispatcher_get_fanout (dispatcher), ==, 1);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*stats != NULL*");
  kd_dispatcher_get_stats (dispatcher, NULL);
  g_test_assert_expected_messages ();

  g_assert_true (kd_dispatcher_submit (dispatcher, "k", NULL, NULL));

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_dispatcher_set_capacity (dispatcher, 7);
  g_test_assert_expected_messages ();
  g_assert_cmpuint (kd_dispatcher_get_capacity (dispatcher), ==, 1024);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_dispatcher_set_fanout (dispatcher, 2);
  g_test_assert_expected_messages ();
  g_assert_cmpuint (kd_dispatcher_get_fanout (dispatcher), ==, 1);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_dispatcher_set_item_free (dispatcher, g_free);
  g_test_assert_expected_messages ();

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
  kd_dispatcher_set_key_capacity (dispatcher, 1);
  g_test_assert_expected_messages ();
  g_assert_cmpuint (kd_dispatcher_get_key_capacity (dispatcher), ==, 0);

  {
    GCancellable *cancellable = g_cancellable_new ();
    GMainContext *context = g_main_context_new ();

    /* Each refused, and none of its effects seen below: the job completes
     * with no done callback, no state, no retry, on an uncancelled
     * dispatcher. */
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_key_idle_time (dispatcher, 1);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_retry (dispatcher, 3, 0, 0);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_dead_letter_func (dispatcher, NULL, NULL, NULL);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_worker_funcs (dispatcher, NULL, NULL, NULL, NULL);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_key_state_funcs (dispatcher, NULL, NULL, NULL, NULL);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_done_func (dispatcher, NULL, NULL, NULL);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_cancellable (dispatcher, cancellable);
    g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, "*before its first submit*");
    kd_dispatcher_set_main_context (dispatcher, context);
    g_test_assert_expected_messages ();
    g_assert_true (kd_dispatcher_get_cancellable (dispatcher) != cancellable);
    g_assert_null (kd_dispatcher_get_main_context (dispatcher));
    g_cancellable_cancel (cancellable);
    g_object_unref (cancellable);
    g_main_context_unref (context);
  }

  kd_dispatcher_wait (dispatcher);
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.completed, ==, 1);
  g_assert_cmpint (item, ==, 0);

  g_object_unref (dispatcher);
}

/* ------------------------------------------------------------------------ */
/* Keys are byte strings, the empty one too                                 */

/* The handlers saw @key once, with its NULL item. */
static void
assert_ran_once_with_null_item (KdTestRecorder *recorder,
                                const char     *key)
{
  GPtrArray *items = kd_test_recorder_items_of (recorder, key);

  g_assert_cmpuint (items->len, ==, 1);
  g_assert_null (g_ptr_array_index (items, 0));
  g_ptr_array_unref (items);
}

static gint null_items_freed;

static void
count_null_item_free (gpointer item)
{
  g_assert_null (item);
  g_atomic_int_inc (&null_items_freed);
}

static void
test_keys_as_bytes (void)
{
  static const char *distinct[] = {
    "", "a", "A", "a\xff", "a\xfe", "\xc3\xa9" /* é, NFC */, "e\xcc\x81" /* é, NFD */,
    "k", "k ", " k",
  };
  KdTestRecorder recorder;
  KdDispatcher *dispatcher;
  guint n = G_N_ELEMENTS (distinct);
  char *big_key;
  gsize big_size = 1024 * 1024;
  KdStats stats;
  guint i;

  g_test_summary ("The empty string is a key, a 1 MiB key works, keys are copied at "
                  "submit and compared as byte strings, NULL items are allowed (and item_free "
                  "runs on them, once)");

  kd_test_recorder_init (&recorder);
  dispatcher = kd_dispatcher_new (n + 2, kd_test_recorder_handler, &recorder, NULL);
  null_items_freed = 0;
  kd_dispatcher_set_item_free (dispatcher, count_null_item_free);

  for (i = 0; i < n; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, distinct[i], NULL, NULL));

  /* Two 1 MiB keys that differ in their last byte; the buffer is changed
   * right after each submit. */
  big_key = g_malloc (big_size + 1);
  memset (big_key, 'x', big_size);
  big_key[big_size] = '\0';
  g_assert_true (kd_dispatcher_submit (dispatcher, big_key, NULL, NULL));
  big_key[big_size - 1] = 'y';
  g_assert_true (kd_dispatcher_submit (dispatcher, big_key, NULL, NULL));
  big_key[big_size - 1] = 'z';

  /* Every key got a mailbox of its own and all run at once. */
  g_assert_true (kd_test_hold_wait_arrived (&recorder.hold, n + 2));
  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.live_keys, ==, n + 2);

  kd_test_hold_release (&recorder.hold);
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpuint (recorder.keys->len, ==, n + 2);
  for (i = 0; i < n; i++)
    assert_ran_once_with_null_item (&recorder, distinct[i]);
  for (i = 0; i < 2; i++)
    {
      big_key[big_size - 1] = i == 0 ? 'x' : 'y';
      assert_ran_once_with_null_item (&recorder, big_key);
    }
  g_assert_cmpint (null_items_freed, ==, n + 2);

  kd_dispatcher_get_stats (dispatcher, &stats);
  g_assert_cmpuint (stats.live_keys, ==, 0);

  g_object_unref (dispatcher);
  g_free (big_key);
  kd_test_recorder_clear (&recorder);
}

typedef struct
{
  KdTestKeyTurn turn;
  gint          overlaps;
  gint          out_of_order;
} EmptyKey;

static gboolean
empty_key_handler (KdJob    *job,
                   gpointer  user_data,
                   GError  **error)
{
  EmptyKey *empty = user_data;

  g_assert_cmpstr (kd_job_get_key (job), ==, "");
  kd_test_key_turn_take (&empty->turn, GPOINTER_TO_UINT (kd_job_get_item (job)), &empty->overlaps,
                         &empty->out_of_order);
  kd_test_spin (GPOINTER_TO_UINT (kd_job_get_item (job)) % 300);
  kd_test_key_turn_give (&empty->turn);
  return TRUE;
}

static void
test_empty_key_order (void)
{
  EmptyKey empty = { 0 };
  KdDispatcher *dispatcher;
  gint i;

  g_test_summary ("Jobs keyed by the empty string run in order, one at a time");

  dispatcher = kd_dispatcher_new (4, empty_key_handler, &empty, NULL);
  for (i = 0; i < 5000; i++)
    g_assert_true (kd_dispatcher_submit (dispatcher, "", GINT_TO_POINTER (i), NULL));
  kd_dispatcher_wait (dispatcher);

  g_assert_cmpuint (empty.turn.next, ==, 5000);
  g_assert_cmpint (empty.overlaps, ==, 0);
  g_assert_cmpint (empty.out_of_order, ==, 0);
  g_object_unref (dispatcher);
}

/* ------------------------------------------------------------------------ */
/* Logging                                                                  */

static void
test_debug_logging (void)
{
  KdDispatcher *dispatcher;
  GLogLevelFlags fatal_before;
  GLogLevelFlags fatal_after;

  g_test_summary ("Debug messages go to the kdispatch log domain, and using a "
                  "dispatcher changes nothing process-wide in logging");

  fatal_before = g_log_set_always_fatal (G_LOG_FATAL_MASK);
  g_log_set_always_fatal (fatal_before);

  dispatcher = kd_dispatcher_new (1, kd_test_noop_handler, NULL, NULL);
  g_test_expect_message ("kdispatch", G_LOG_LEVEL_DEBUG, "*started 1 workers*");
  g_assert_true (kd_dispatcher_submit (dispatcher, NULL, NULL, NULL));
  g_test_assert_expected_messages ();

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_DEBUG, "*cancelled*");
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  g_test_assert_expected_messages ();

  kd_dispatcher_wait (dispatcher);
  g_object_unref (dispatcher);

  fatal_after = g_log_set_always_fatal (G_LOG_FATAL_MASK);
  g_log_set_always_fatal (fatal_after);
  g_assert_cmpint (fatal_after, ==, fatal_before);
}

int
main (int    argc,
      char **argv)
{
  g_test_init (&argc, &argv, NULL);

  g_test_add_func ("/kd/dispatcher/per-key-order", test_per_key_order);
  g_test_add_func ("/kd/dispatcher/few-keys-exclusive", test_few_keys_exclusive);
  g_test_add_func ("/kd/dispatcher/unkeyed-parallel", test_unkeyed_parallel);
  g_test_add_func ("/kd/dispatcher/keyed-parallel", test_keyed_parallel);
  g_test_add_func ("/kd/dispatcher/bound", test_bound);
  g_test_add_func ("/kd/dispatcher/bound-small-gap", test_bound_small_gap);
  g_test_add_func ("/kd/dispatcher/bound-flat-memory", test_bound_flat_memory);
  g_test_add_func ("/kd/dispatcher/many-keys", test_many_keys);
  g_test_add_func ("/kd/dispatcher/submit-from-worker", test_submit_from_worker);
  g_test_add_func ("/kd/dispatcher/submit-from-worker-room", test_submit_from_worker_room);
  g_test_add_func ("/kd/dispatcher/hot-key-fairness", test_hot_key_fairness);
  g_test_add_func ("/kd/dispatcher/no-starvation-across-groups", test_no_starvation_across_groups);
  g_test_add_func ("/kd/dispatcher/unkeyed-beyond-ring", test_unkeyed_beyond_ring);
  g_test_add_func ("/kd/dispatcher/unkeyed-and-keyed-take-turns", test_unkeyed_and_keyed_take_turns);
  g_test_add_func ("/kd/dispatcher/unkeyed-not-behind-keys", test_unkeyed_not_behind_keys);
  g_test_add_func ("/kd/dispatcher/bad-input", test_bad_input_preconditions);
  g_test_add_func ("/kd/dispatcher/keys-as-bytes", test_keys_as_bytes);
  g_test_add_func ("/kd/dispatcher/empty-key-order", test_empty_key_order);
  g_test_add_func ("/kd/dispatcher/debug-logging", test_debug_logging);

  return g_test_run ();
}
