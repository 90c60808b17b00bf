/* test-redis-queue.c: KdRedisQueue against a real redis-server and worker processes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each case starts its own redis-server on 127.0.0.1 and stops it
 * afterwards; the cross-process cases run worker processes, whose logs
 * tell whether every job ran, in its key's order, and how many ran twice.
 * The server, the workers, their logs and the waits are the harness's
 * (kd-redis-harness.c).
 *
 * Skipped, with the reason, only when redis-server is not installed.
 */

#include "config.h"

#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kd-redis-consumer-private.h"
#include "kd-redis-harness.h"
/* Its locks, which ThreadSanitizer sees (GLib's futexes it does not). */
#include "kd-sync-private.h"
#include "kd-test-util.h"

/* ---- In one process ---------------------------------------------------- */


static void
test_in_process (void)
{
  Server server = { 0 };
  Seen seen;
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;
  KdRedisQueueStats stats;
  Progress progress;
  Jobs jobs = { 0 };
  guint64 backlog;
  guint i;

  g_test_summary ("One process adds keyed and unkeyed jobs and runs them all, each key's in order, "
                  "and acknowledges every one; the queue's backlog counts them down");
  if (!need_redis ())
    return;

  server_start (&server);
  seen_init (&seen);

  produce (&server, "inproc", 8, 2000, 20, &jobs);
  queue = open_queue (&server, "inproc", 8);
  g_assert_cmpstr (kd_redis_queue_get_name (queue), ==, "inproc");
  g_assert_cmpuint (kd_redis_queue_get_n_shards (queue), ==, 8);
  g_assert_cmpuint (kd_redis_queue_shard_for_key (queue, "key-1"), <, 8);
  /* Every job runs once, in order, only if no stall reaches the margin of
   * a third of the lease (a loaded CI machine, sanitizers, an AOF fsync):
   * a lease of 10 s makes one implausible, and nothing here waits for a
   * lease to expire. */
  kd_redis_queue_set_lease_time (queue, 10 * G_USEC_PER_SEC);
  kd_redis_queue_set_batch_size (queue, 64);
  g_assert_cmpuint (kd_redis_queue_get_batch_size (queue), ==, 64);
  for (i = 0; i < 100; i++)
    {
      g_autofree char *text = g_strdup_printf ("%u", i);
      g_autoptr (GBytes) payload = g_bytes_new (text, strlen (text));

      g_assert_true (kd_redis_queue_add (queue, NULL, payload, &error));
      g_assert_no_error (error);
    }

  /* Nothing runs them yet: the backlog stays. */
  g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (backlog, ==, jobs.total + 100);
  g_assert_false (kd_redis_queue_wait_backlog (queue, 0, 10 * G_TIME_SPAN_MILLISECOND, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT);
  g_clear_error (&error);

  dispatcher = kd_redis_queue_new_dispatcher (queue, 4, seen_record, &seen, NULL);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);

  /* Woken by the consumer's acknowledgements until none is left. */
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_mutex_lock (&seen.lock);
  g_assert_cmpuint (seen.keyed, ==, jobs.total);
  g_assert_cmpuint (seen.unkeyed, ==, 100);
  kd_mutex_unlock (&seen.lock);
  g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
  g_assert_cmpuint (backlog, ==, 0);

  kd_redis_queue_stop (queue);
  kd_redis_queue_get_stats (queue, &stats);
  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, jobs.total);
  g_assert_cmpuint (seen.unkeyed, ==, 100);
  g_assert_cmpuint (stats.acked, ==, jobs.total + 100);
  g_assert_cmpuint (stats.read + stats.claimed, ==, jobs.total + 100);
  g_assert_cmpuint (stats.in_flight, ==, 0);
  g_assert_cmpuint (stats.shards_owned, ==, 0);
  queue_progress (&server.place, "inproc", 8, &progress);
  g_assert_cmpuint (progress.entries, <=, jobs.total + 100);
  g_assert_cmpuint (progress.unfinished, ==, 0);

  g_clear_object (&dispatcher);
  g_clear_object (&queue);
  seen_clear (&seen);
  g_free (jobs.count);
  server_stop (&server);
}

/* ---- The consumer's state, without Redis -------------------------------- */

static void
test_deadline_fence (void)
{
  KdRedisConfig config = { { (char *) "127.0.0.1", 6379, NULL, NULL, NULL, 0 }, (char *) "fence", 4,
                           G_USEC_PER_SEC, 16, 3, 0, 0 };
  KdRedisConsumer *consumer;
  KdRedisShard *shard;
  KdRedisEntry *first, *second;

  g_test_summary ("An entry skipped because its shard's deadline passed fences the shard at once: "
                  "a renewal answered late cannot let the key's next entry start while the "
                  "skipped one waits, pending, for a takeover");

  consumer = kd_redis_consumer_new (&config, "member");
  shard = &consumer->shards[1];
  /* Read under generation 1; the renewals stalled, and the deadline passed. */
  shard->state = KD_REDIS_SHARD_READING;
  shard->generation = 1;
  shard->deadline = g_get_monotonic_time () - 1;
  first = kd_redis_entry_new (consumer, 1, 1, "1-0", 3, "k", 1, "1", 1, "p", 1, 1);
  second = kd_redis_entry_new (consumer, 1, 1, "2-0", 3, "k", 1, "2", 1, "p", 1, 2);
  g_assert_false (kd_redis_consumer_may_start (consumer, first));

  /* A renewal sent before the deadline and answered after it extends the
   * deadline of the generation it was sent under, as lease_tick() does. */
  if (shard->generation == 1 && kd_redis_shard_owned (shard))
    shard->deadline = g_get_monotonic_time () + G_USEC_PER_SEC;
  g_assert_false (kd_redis_consumer_may_start (consumer, second));
  g_assert_cmpint (shard->state, ==, KD_REDIS_SHARD_FREE);
  g_assert_cmpuint (shard->generation, !=, 1);

  kd_redis_entry_unref (first);
  kd_redis_entry_unref (second);
  kd_redis_consumer_unref (consumer);
}

typedef struct
{
  GMutex        lock;
  GCond         cond;
  KdDispatcher *dispatcher;
  guint         close_at;    /* its job that closes the dispatcher; 0: none */
  guint         runs;
  gboolean      closed;
} Closer;

static gboolean
close_after_job (KdJob    *job,
                 gpointer  user_data,
                 GError  **error)
{
  Closer *closer = user_data;
  gboolean close_now;

  kd_mutex_lock (&closer->lock);
  close_now = ++closer->runs == closer->close_at;
  kd_mutex_unlock (&closer->lock);
  if (close_now)
    {
      kd_dispatcher_close (closer->dispatcher);
      kd_mutex_lock (&closer->lock);
      closer->closed = TRUE;
      g_cond_broadcast (&closer->cond);
      kd_mutex_unlock (&closer->lock);
    }
  return TRUE;
}

static void
test_closed (void)
{
  Server server = { 0 };
  Closer closers[2] = { 0 };
  KdRedisQueue *queues[2];
  KdDispatcher *dispatchers[2];
  KdRedisQueueStats stats[2];
  g_autoptr (GError) error = NULL;
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;
  Jobs jobs = { 0 };
  guint runs[2];
  guint i;

  g_test_summary ("A consumer whose dispatcher is closed without being cancelled leaves the queue: "
                  "once the jobs it accepted ended and were acknowledged it releases its leases "
                  "and leaves the members; the other consumer takes every shard over and runs "
                  "every other job, the ones the closed dispatcher refused included");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "closed", 16, 4000, 40, &jobs);
  for (i = 0; i < 2; i++)
    {
      g_mutex_init (&closers[i].lock);
      g_cond_init (&closers[i].cond);
      closers[i].close_at = i == 0 ? 100 : 0;
      queues[i] = open_queue (&server, "closed", 16);
      kd_redis_queue_set_lease_time (queues[i], G_USEC_PER_SEC);
      kd_redis_queue_set_batch_size (queues[i], 64);
      dispatchers[i] = kd_redis_queue_new_dispatcher (queues[i], 2, close_after_job, &closers[i], NULL);
      closers[i].dispatcher = dispatchers[i];
    }

  /* The first takes every shard, and its 100th job closes its dispatcher;
   * then the second joins. */
  g_assert_true (kd_redis_queue_start (queues[0], &error));
  g_assert_no_error (error);
  kd_mutex_lock (&closers[0].lock);
  while (!closers[0].closed)
    g_assert_true (kd_cond_wait_until (&closers[0].cond, &closers[0].lock, deadline));
  kd_mutex_unlock (&closers[0].lock);
  g_assert_true (kd_redis_queue_start (queues[1], &error));
  g_assert_no_error (error);

  /* Had the first kept its leases, the jobs of its shards would wait for
   * ever: a few leases are plenty. */
  g_assert_true (kd_redis_queue_wait_backlog (queues[1], 0, 30 * G_USEC_PER_SEC, &error));
  g_assert_no_error (error);

  /* The first left before the second took its shards: its counters are
   * final. The second's last acknowledgements reach Redis (and the backlog)
   * before its acker counts them; they are all counted once stop returns. */
  kd_redis_queue_stop (queues[1]);
  for (i = 0; i < 2; i++)
    {
      kd_redis_queue_get_stats (queues[i], &stats[i]);
      kd_mutex_lock (&closers[i].lock);
      runs[i] = closers[i].runs;
      kd_mutex_unlock (&closers[i].lock);
    }
  g_test_message ("closed: ran %u, acknowledged %" G_GUINT64_FORMAT "; other: ran %u, took over %"
                  G_GUINT64_FORMAT, runs[0], stats[0].acked, runs[1], stats[1].claimed);
  /* It left: it holds nothing, and every job it ran was acknowledged. */
  g_assert_cmpuint (stats[0].shards_owned, ==, 0);
  g_assert_cmpuint (stats[0].in_flight, ==, 0);
  g_assert_cmpuint (stats[0].refused, ==, 0);
  g_assert_cmpuint (stats[0].acked, ==, runs[0]);
  g_assert_cmpuint (runs[1], >, 0);
  g_assert_cmpuint (runs[0] + runs[1], ==, jobs.total);
  g_assert_cmpuint (stats[0].acked + stats[1].acked, ==, jobs.total);

  for (i = 0; i < 2; i++)
    {
      kd_redis_queue_stop (queues[i]);
      g_object_unref (dispatchers[i]);
      g_object_unref (queues[i]);
      g_mutex_clear (&closers[i].lock);
      g_cond_clear (&closers[i].cond);
    }
  g_free (jobs.count);
  server_stop (&server);
}

typedef struct
{
  GMutex   lock;
  GCond    cond;
  guint    n_entered;
  gboolean open;
} Gate;

/* Says the gate was reached, and waits until it opens. */
static void
gate_pass (Gate *gate)
{
  kd_mutex_lock (&gate->lock);
  gate->n_entered++;
  g_cond_broadcast (&gate->cond);
  while (!gate->open)
    kd_cond_wait (&gate->cond, &gate->lock);
  kd_mutex_unlock (&gate->lock);
}

/* The job of key "gate" waits until the gate opens; the others complete. */
static gboolean
gate_job (KdJob    *job,
          gpointer  user_data,
          GError  **error)
{
  if (g_strcmp0 (kd_job_get_key (job), "gate") == 0)
    gate_pass (user_data);
  return TRUE;
}

static void
test_trim (void)
{
  Server server = { 0 };
  Gate gate = { 0 };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GError) error = NULL;
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;
  Jobs jobs = { 0 };
  Progress progress;
  guint64 trimmed;
  guint i;

  g_test_summary ("Trimming removes the entries every group acknowledged, and keeps every one "
                  "that is pending (read, its job running or waiting) or not read yet");
  if (!need_redis ())
    return;

  server_start (&server);
  g_mutex_init (&gate.lock);
  g_cond_init (&gate.cond);
  /* One entry in flight at a time: once the gate's job holds it, the
   * other streams have entries not read yet and none pending. */
  queue = open_queue (&server, "trim", 4);
  kd_redis_queue_set_batch_size (queue, 1);
  dispatcher = kd_redis_queue_new_dispatcher (queue, 1, gate_job, &gate, NULL);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);

  /* All acknowledged: all trimmed (by the owners' rounds or this call). */
  produce (&server, "trim", 4, 1000, 20, &jobs);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_trim (queue, &trimmed, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (streams_length (&server.place, "trim", 4), ==, 0);

  /* The gate's job holds the only worker and the only place in flight:
   * its entry is pending, the ones after it are not read yet. None of them
   * may go. */
  g_ptr_array_add (keys, g_strdup ("gate"));
  for (i = 0; i < 200; i++)
    g_ptr_array_add (keys, i % 10 == 0 ? NULL : g_strdup_printf ("key-%u", i % 20));
  for (i = 0; i < keys->len; i++)
    g_ptr_array_add (payloads, g_bytes_new_static ("x", 1));
  g_assert_true (kd_redis_queue_add_many (queue, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &error));
  g_assert_no_error (error);
  kd_mutex_lock (&gate.lock);
  while (gate.n_entered == 0)
    g_assert_true (kd_cond_wait_until (&gate.cond, &gate.lock, deadline));
  kd_mutex_unlock (&gate.lock);
  g_assert_true (kd_redis_queue_trim (queue, &trimmed, &error));
  g_assert_no_error (error);
  /* A few jobs may have run before the gate's: only they could go. */
  queue_progress (&server.place, "trim", 4, &progress);
  g_test_message ("%" G_GUINT64_FORMAT " unfinished, %" G_GUINT64_FORMAT " trimmed", progress.unfinished, trimmed);
  g_assert_cmpuint (progress.unfinished, >, keys->len / 2);
  g_assert_cmpuint (unfinished_present (&server.place, "trim", 4), ==, progress.unfinished);

  /* Once they are acknowledged, they go too. */
  kd_mutex_lock (&gate.lock);
  gate.open = TRUE;
  g_cond_broadcast (&gate.cond);
  kd_mutex_unlock (&gate.lock);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_trim (queue, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (streams_length (&server.place, "trim", 4), ==, 0);

  kd_redis_queue_stop (queue);
  g_clear_object (&dispatcher);
  g_clear_object (&queue);
  g_mutex_clear (&gate.lock);
  g_cond_clear (&gate.cond);
  g_free (jobs.count);
  server_stop (&server);
}

/* The jobs whose payload is "gate" wait until the gate opens; the others
 * complete. */
static gboolean
gate_payload_job (KdJob    *job,
                  gpointer  user_data,
                  GError  **error)
{
  gsize len;
  const guint8 *payload = kd_redis_entry_get_payload (kd_job_get_item (job), &len);

  if (len == 4 && memcmp (payload, "gate", 4) == 0)
    gate_pass (user_data);
  return TRUE;
}

static void
test_stop_unreachable (void)
{
  Server server = { 0 };
  Gate gate = { 0 };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GBytes) payload = g_bytes_new_static ("gate", 4);
  g_autoptr (GError) error = NULL;
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;
  KdRedisQueueStats stats;

  g_test_summary ("A stop whose drain times out, Redis unreachable, accounts for the jobs that ended "
                  "unacknowledged as refused: nothing is left in flight, and the queue started "
                  "again takes its shards back and runs them");
  if (!need_redis ())
    return;

  server_start (&server);
  g_mutex_init (&gate.lock);
  g_cond_init (&gate.cond);
  queue = open_queue (&server, "unreachable", 4);
  kd_redis_queue_set_lease_time (queue, 500 * G_TIME_SPAN_MILLISECOND);
  dispatcher = kd_redis_queue_new_dispatcher (queue, 2, gate_payload_job, &gate, NULL);
  g_assert_true (kd_redis_queue_add (queue, "key", payload, &error));
  g_assert_true (kd_redis_queue_add (queue, NULL, payload, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);

  /* Both jobs run; Redis freezes; they end, and their acknowledgements
   * cannot be sent before stop() gives up on them. */
  kd_mutex_lock (&gate.lock);
  while (gate.n_entered < 2)
    g_assert_true (kd_cond_wait_until (&gate.cond, &gate.lock, deadline));
  kd_mutex_unlock (&gate.lock);
  server_freeze (&server);
  kd_mutex_lock (&gate.lock);
  gate.open = TRUE;
  g_cond_broadcast (&gate.cond);
  kd_mutex_unlock (&gate.lock);
  kd_redis_queue_stop (queue);
  kd_redis_queue_get_stats (queue, &stats);
  g_assert_cmpuint (stats.in_flight, ==, 0);
  g_assert_cmpuint (stats.refused, ==, 2);
  g_assert_cmpuint (stats.acked, ==, 0);

  /* Started again: the shards can be taken, the entries left pending are
   * claimed (the unkeyed one once idle for two leases) and run again. */
  g_subprocess_send_signal (server.process, SIGCONT);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_stop (queue);
  kd_redis_queue_get_stats (queue, &stats);
  g_assert_cmpuint (stats.in_flight, ==, 0);
  g_assert_cmpuint (stats.acked, ==, 2);
  kd_mutex_lock (&gate.lock);
  g_assert_cmpuint (gate.n_entered, ==, 4);
  kd_mutex_unlock (&gate.lock);

  g_clear_object (&dispatcher);
  g_clear_object (&queue);
  g_mutex_clear (&gate.lock);
  g_cond_clear (&gate.cond);
  server_stop (&server);
}

static void
test_oversized (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (GError) error = NULL;
  const char *keys[3] = { "a", "b", NULL };
  GBytes *payloads[3];
  gsize size = KD_REDIS_QUEUE_MAX_FIELD_SIZE + 1;
  guint64 backlog;
  void *huge;
  guint i;

  g_test_summary ("A payload longer than KD_REDIS_QUEUE_MAX_FIELD_SIZE is refused with "
                  "G_IO_ERROR_INVALID_ARGUMENT before any job of the call is sent");
  if (!need_redis ())
    return;

  server_start (&server);
  queue = open_queue (&server, "oversized", 4);
  /* Never touched, so never allocated: the check reads the size only. */
  huge = mmap (NULL, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  g_assert_true (huge != MAP_FAILED);
  payloads[0] = g_bytes_new_static ("1", 1);
  payloads[1] = g_bytes_new_static (huge, size);
  payloads[2] = g_bytes_new_static ("3", 1);
  g_assert_false (kd_redis_queue_add_many (queue, 3, keys, payloads, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT);
  g_test_message ("%s", error->message);
  g_clear_error (&error);
  g_assert_false (kd_redis_queue_add (queue, NULL, payloads[1], &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT);
  g_clear_error (&error);

  /* Nothing was added, and the queue still works. */
  g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (backlog, ==, 0);
  g_assert_true (kd_redis_queue_add (queue, "a", payloads[0], &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
  g_assert_cmpuint (backlog, ==, 1);

  for (i = 0; i < 3; i++)
    g_bytes_unref (payloads[i]);
  munmap (huge, size);
  g_clear_object (&queue);
  server_stop (&server);
}

static gboolean
fail_job (KdJob    *job,
          gpointer  user_data,
          GError  **error)
{
  g_atomic_int_inc ((gint *) user_data);
  g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "always fails");
  return FALSE;
}

static void
test_park_refused (void)
{
  g_autoptr (KdRedisQueue) queue = kd_redis_queue_new ("park");
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;
  gint runs = 0;

  g_test_summary ("kd_redis_queue_start() refuses a dispatcher set to park keys (KD_FAILURE_PARK), "
                  "before it connects");

  dispatcher = kd_redis_queue_new_dispatcher (queue, 1, fail_job, &runs, NULL);
  kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  g_assert_false (kd_redis_queue_start (queue, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED);
}

static void
test_dispatcher_retry (void)
{
  Server server = { 0 };
  g_autoptr (GError) error = NULL;
  g_autoptr (GBytes) payload = g_bytes_new_static ("x", 1);
  const guint attempts[2] = { 1, 5 };
  guint i, j;

  g_test_summary ("A retry set on the queue's dispatcher after kd_redis_queue_new_dispatcher() takes "
                  "precedence: each failing job is dead-lettered after the dispatcher's last "
                  "attempt, more or fewer than the queue's, never stranded");
  if (!need_redis ())
    return;

  server_start (&server);
  for (i = 0; i < 2; i++)
    {
      g_autofree char *name = g_strdup_printf ("retry-%u", attempts[i]);
      g_autoptr (KdRedisQueue) queue = open_queue (&server, name, 4);
      g_autoptr (KdDispatcher) dispatcher = NULL;
      KdRedisQueueStats stats;
      gint runs = 0;

      kd_redis_queue_set_retry (queue, 3, 0, 0);
      dispatcher = kd_redis_queue_new_dispatcher (queue, 2, fail_job, &runs, NULL);
      kd_dispatcher_set_retry (dispatcher, attempts[i], 0, 0);
      for (j = 0; j < 4; j++)
        {
          g_autofree char *key = g_strdup_printf ("key-%u", j);

          g_assert_true (kd_redis_queue_add (queue, key, payload, &error));
          g_assert_no_error (error);
        }
      g_assert_true (kd_redis_queue_start (queue, &error));
      g_assert_no_error (error);
      g_assert_true (kd_redis_queue_wait_backlog (queue, 0, 30 * G_USEC_PER_SEC, &error));
      g_assert_no_error (error);
      kd_redis_queue_stop (queue);
      kd_redis_queue_get_stats (queue, &stats);
      g_assert_cmpuint (stats.dead_lettered, ==, 4);
      g_assert_cmpuint (stats.in_flight, ==, 0);
      g_assert_cmpint (g_atomic_int_get (&runs), ==, 4 * attempts[i]);
    }
  server_stop (&server);
}

static void
test_other_shards (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (KdRedisQueue) other = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GBytes) payload = g_bytes_new_static ("x", 1);
  g_autoptr (GError) error = NULL;
  redisContext *c;
  redisReply *reply;

  g_test_summary ("A process configured with another number of shards than the queue was created "
                  "with fails to add or consume, and leaves no stream of its own behind");
  if (!need_redis ())
    return;

  server_start (&server);
  queue = open_queue (&server, "shards", 4);
  g_assert_true (kd_redis_queue_add (queue, "a", payload, &error));
  g_assert_no_error (error);

  other = open_queue (&server, "shards", 8);
  g_assert_false (kd_redis_queue_add (other, "a", payload, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT);
  g_clear_error (&error);
  dispatcher = kd_redis_queue_new_dispatcher (other, 1, seen_record, NULL, NULL);
  g_assert_false (kd_redis_queue_start (other, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT);

  c = server_connect (&server);
  reply = redisCommand (c, "EXISTS shards:{4} shards:{5} shards:{6} shards:{7}");
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->integer, ==, 0);
  freeReplyObject (reply);
  redisFree (c);

  g_clear_object (&dispatcher);
  g_clear_object (&other);
  g_clear_object (&queue);
  server_stop (&server);
}

/* Adds, through @queue, the jobs numbered @from to @to of each key in
 * @keys (payload: the number). */
static void
add_numbers (KdRedisQueue *queue,
             GPtrArray    *keys,
             guint         from,
             guint         to)
{
  g_autoptr (GPtrArray) job_keys = g_ptr_array_new ();
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GError) error = NULL;
  guint i, n;

  for (n = from; n <= to; n++)
    for (i = 0; i < keys->len; i++)
      {
        char *text = g_strdup_printf ("%u", n);

        g_ptr_array_add (job_keys, g_ptr_array_index (keys, i));
        g_ptr_array_add (payloads, g_bytes_new_take (text, strlen (text)));
      }
  g_assert_true (kd_redis_queue_add_many (queue, job_keys->len, (const char **) job_keys->pdata,
                                          (GBytes **) payloads->pdata, &error));
  g_assert_no_error (error);
}

/* How many times Redis ran @command (as INFO commandstats names it). */
static guint64
command_calls (redisContext *c,
               const char   *command)
{
  g_autofree char *field = g_strdup_printf ("cmdstat_%s:calls=", command);
  redisReply *reply = redisCommand (c, "INFO commandstats");
  const char *at;
  guint64 calls = 0;

  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_STRING);
  at = strstr (reply->str, field);
  if (at != NULL)
    calls = g_ascii_strtoull (at + strlen (field), NULL, 10);
  freeReplyObject (reply);
  return calls;
}

static void
test_bad_stream (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) producer = NULL;
  g_autoptr (KdRedisQueue) consumer = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GPtrArray) good = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) bad = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GBytes) payload = g_bytes_new_static ("1", 1);
  g_autoptr (GError) error = NULL;
  KdRedisQueueStats stats;
  Seen seen;
  guint64 backlog, groups_created;
  redisContext *c;
  redisReply *reply;
  guint i;

  g_test_summary ("A shard's stream that is a key of another type is set aside (and a shard whose "
                  "fencing-token key is one is never leased): adds to it fail "
                  "at once with an error naming it, nothing sent, each after one look at that stream "
                  "alone, while adds to the other shards "
                  "work; the consumer runs the other shards' 10,000 jobs over 100 keys in order "
                  "and counts the stream "
                  "set aside; once the key is gone the stream is taken back, by the producer at "
                  "its next add and by the running consumer, and its jobs run");
  if (!need_redis ())
    return;

  server_start (&server);
  producer = open_queue (&server, "bad", 8);
  for (i = 0; good->len < 100 || bad->len < 2; i++)
    {
      char *key = g_strdup_printf ("client-%u", i);
      guint shard = kd_redis_queue_shard_for_key (producer, key);

      if (shard == 5)
        g_free (key);
      else
        g_ptr_array_add (shard == 3 ? bad : good, key);
    }
  c = server_connect (&server);
  reply = redisCommand (c, "SET bad:{3} x");
  freeReplyObject (reply);
  /* Shard 5's fencing token is a list: only shard 5 (which has no job here)
   * cannot be leased. */
  reply = redisCommand (c, "LPUSH bad:{5}:fence x");
  freeReplyObject (reply);

  add_numbers (producer, good, 1, 100);
  g_assert_false (kd_redis_queue_add (producer, g_ptr_array_index (bad, 0), payload, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA);
  g_assert_nonnull (strstr (error->message, "bad:{3}"));
  g_assert_nonnull (strstr (error->message, "WRONGTYPE"));
  g_clear_error (&error);
  /* Each add to it looks at the stream set aside again, and at it alone. */
  groups_created = command_calls (c, "xgroup|create");
  for (i = 0; i < 10; i++)
    {
      g_assert_false (kd_redis_queue_add (producer, g_ptr_array_index (bad, 0), payload, &error));
      g_assert_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA);
      g_clear_error (&error);
    }
  g_assert_cmpuint (command_calls (c, "xgroup|create") - groups_created, ==, 10);
  g_assert_true (kd_redis_queue_get_backlog (producer, &backlog, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (backlog, ==, 100 * good->len);

  /* The consumer goes on with the other shards. */
  consumer = open_queue (&server, "bad", 8);
  kd_redis_queue_set_lease_time (consumer, 10 * G_USEC_PER_SEC);
  seen_init (&seen);
  dispatcher = kd_redis_queue_new_dispatcher (consumer, 2, seen_record, &seen, NULL);
  g_assert_true (kd_redis_queue_start (consumer, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (producer, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_get_stats (consumer, &stats);
  g_assert_cmpuint (stats.streams_set_aside, ==, 1);

  /* Repaired: the producer looks again, and the consumer, within a tick. */
  reply = redisCommand (c, "DEL bad:{3}");
  freeReplyObject (reply);
  add_numbers (producer, bad, 1, 5);
  add_numbers (producer, good, 101, 102);
  g_assert_true (kd_redis_queue_wait_backlog (producer, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_stop (consumer);
  kd_dispatcher_wait (dispatcher);
  kd_redis_queue_get_stats (consumer, &stats);
  g_assert_cmpuint (stats.streams_set_aside, ==, 0);
  g_assert_cmpuint (stats.acked, ==, 102 * good->len + 5 * bad->len);

  kd_mutex_lock (&seen.lock);
  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, 102 * good->len + 5 * bad->len);
  kd_mutex_unlock (&seen.lock);
  seen_clear (&seen);
  redisFree (c);
  g_clear_object (&dispatcher);
  server_stop (&server);
}

static void
test_forget_past_refused_stream (void)
{
  Server server = { 0 };
  redisContext *c;
  redisReply *reply;

  g_test_summary ("The script that forgets the consumers of members gone passes over a stream "
                  "Redis refuses (a key of another type since the round began), forgets them "
                  "on the others, and keeps the consumers of live members");
  if (!need_redis ())
    return;

  server_start (&server);
  c = server_connect (&server);
  g_assert_nonnull (c);
  reply = redisCommand (c, "XGROUP CREATE q:{1} " KD_REDIS_GROUP " 0 MKSTREAM");
  freeReplyObject (reply);
  reply = redisCommand (c, "XGROUP CREATECONSUMER q:{1} " KD_REDIS_GROUP " gone");
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->integer, ==, 1);
  freeReplyObject (reply);
  reply = redisCommand (c, "XGROUP CREATECONSUMER q:{1} " KD_REDIS_GROUP " alive");
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->integer, ==, 1);
  freeReplyObject (reply);
  reply = redisCommand (c, "SET q:{0} x");
  freeReplyObject (reply);

  /* Gone: idle for more than -1 ms and not among the live members (only
   * "alive" is). The refused stream first. */
  reply = redisCommand (c, "EVAL %s 2 q:{0} q:{1} " KD_REDIS_GROUP " -1 alive",
                        kd_redis_script_source (KD_REDIS_SCRIPT_FORGET));
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_INTEGER);
  g_assert_cmpint (reply->integer, ==, 1);
  freeReplyObject (reply);
  reply = redisCommand (c, "XINFO CONSUMERS q:{1} " KD_REDIS_GROUP);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
  g_assert_cmpuint (reply->elements, ==, 1);
  freeReplyObject (reply);

  redisFree (c);
  server_stop (&server);
}

/* Notes the highest fencing token each shard's jobs carried, and that an
 * unkeyed job carries 0. */
typedef struct
{
  GMutex  lock;
  guint64 tokens[8];
  guint64 lowest[8];
  gint    unkeyed_nonzero;
  guint   ran;
} Tokens;

static gboolean
record_token (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  Tokens *tokens = user_data;
  KdRedisEntry *entry = kd_job_get_item (job);
  gint shard = kd_redis_entry_get_shard (entry);
  guint64 token = kd_redis_entry_get_fencing_token (entry);

  kd_mutex_lock (&tokens->lock);
  if (shard < 0)
    tokens->unkeyed_nonzero += token != 0;
  else
    {
      tokens->tokens[shard] = MAX (tokens->tokens[shard], token);
      tokens->lowest[shard] = tokens->lowest[shard] == 0 ? token : MIN (tokens->lowest[shard], token);
    }
  tokens->ran++;
  kd_mutex_unlock (&tokens->lock);
  return TRUE;
}

/* Runs @name's jobs with a consumer of its own until none is left. */
static void
run_recording_tokens (Server     *server,
                      const char *name,
                      Tokens     *tokens)
{
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, 8);
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;

  kd_redis_queue_set_lease_time (queue, 10 * G_USEC_PER_SEC);
  dispatcher = kd_redis_queue_new_dispatcher (queue, 2, record_token, tokens, NULL);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_stop (queue);
  kd_dispatcher_wait (dispatcher);
}

/* Deletes queue @name's fencing-token keys, as a Redis that lost their
 * writes would have none. */
static void
forget_fencing_tokens (Server     *server,
                       const char *name,
                       guint       n_shards)
{
  redisContext *c = server_connect (server);
  guint shard;

  g_assert_nonnull (c);
  for (shard = 0; shard < n_shards; shard++)
    {
      g_autofree char *fence = g_strdup_printf ("%s:{%u}:fence", name, shard);
      redisReply *reply = redisCommand (c, "DEL %s", fence);

      g_assert_nonnull (reply);
      freeReplyObject (reply);
    }
  redisFree (c);
}

static void
test_fencing_tokens (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) producer = NULL;
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GBytes) payload = g_bytes_new_static ("1", 1);
  g_autoptr (GError) error = NULL;
  Tokens first = { 0 }, second = { 0 };
  guint i, shard, shards_seen = 0;

  g_test_summary ("Each shard's jobs carry the shard's fencing token: one value per owner, "
                  "higher for every later owner of the shard, even when Redis lost the last "
                  "token; unkeyed jobs carry 0");
  if (!need_redis ())
    return;

  server_start (&server);
  producer = open_queue (&server, "fence", 8);
  for (i = 0; i < 64; i++)
    g_ptr_array_add (keys, g_strdup_printf ("client-%u", i));
  add_numbers (producer, keys, 1, 5);
  g_assert_true (kd_redis_queue_add (producer, NULL, payload, &error));
  g_assert_no_error (error);

  g_mutex_init (&first.lock);
  run_recording_tokens (&server, "fence", &first);
  /* As if Redis lost the tokens' writes (a restart from an append-only
   * file a second behind): the next owner's tokens must still be higher. */
  forget_fencing_tokens (&server, "fence", 8);
  /* A second owner, after the first let its shards go. */
  add_numbers (producer, keys, 6, 10);
  g_mutex_init (&second.lock);
  run_recording_tokens (&server, "fence", &second);

  g_assert_cmpuint (first.ran, ==, 64 * 5 + 1);
  g_assert_cmpuint (second.ran, ==, 64 * 5);
  g_assert_cmpint (first.unkeyed_nonzero, ==, 0);
  for (shard = 0; shard < 8; shard++)
    {
      if (first.tokens[shard] == 0 && second.tokens[shard] == 0)
        continue;   /* no key of this shard */
      shards_seen++;
      g_assert_cmpuint (first.lowest[shard], >=, 1);
      g_assert_cmpuint (first.lowest[shard], ==, first.tokens[shard]);
      g_assert_cmpuint (second.lowest[shard], >, first.tokens[shard]);
    }
  g_assert_cmpuint (shards_seen, >=, 4);
  g_mutex_clear (&first.lock);
  g_mutex_clear (&second.lock);
  server_stop (&server);
}

/* ---- Producers that send a job twice ----------------------------------- */

/* Makes @n jobs, each key's numbered on from @jobs. */
static void
add_numbered (Jobs      *jobs,
              guint      n,
              GRand     *rand,
              GPtrArray *keys,
              GPtrArray *payloads)
{
  guint i;

  for (i = 0; i < n; i++)
    {
      guint k = (guint) g_rand_int_range (rand, 0, (gint32) jobs->n_keys);
      char *text = g_strdup_printf ("%u", ++jobs->count[k]);

      g_ptr_array_add (keys, g_strdup_printf ("key-%u", k));
      g_ptr_array_add (payloads, g_bytes_new_take (text, strlen (text)));
    }
  jobs->total += n;
}

/* Adds again, at the end of each stream of @name, the last @n entries of
 * it, field for field: what a producer that lost the replies to them and
 * sent them again leaves. Returns how many it added. */
static guint
copy_tails (Server     *server,
            const char *name,
            guint       n_shards,
            guint       n)
{
  redisContext *c = server_connect (server);
  guint copied = 0;
  gint shard;

  g_assert_nonnull (c);
  for (shard = 0; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);
      redisReply *tail = redisCommand (c, "XREVRANGE %s + - COUNT %u", stream, n);
      gsize i, f;

      g_assert_nonnull (tail);
      g_assert_cmpint (tail->type, ==, REDIS_REPLY_ARRAY);
      for (i = tail->elements; i > 0; i--)
        {
          redisReply *fields = tail->element[i - 1]->element[1];
          g_autoptr (GPtrArray) argv = g_ptr_array_new ();
          g_autoptr (GArray) argvlen = g_array_new (FALSE, FALSE, sizeof (size_t));
          const char *head[] = { "XADD", stream, "*" };
          redisReply *added;

          for (f = 0; f < G_N_ELEMENTS (head) + fields->elements; f++)
            {
              const char *arg = f < G_N_ELEMENTS (head) ? head[f] : fields->element[f - G_N_ELEMENTS (head)]->str;
              size_t len = f < G_N_ELEMENTS (head) ? strlen (arg) : fields->element[f - G_N_ELEMENTS (head)]->len;

              g_ptr_array_add (argv, (gpointer) arg);
              g_array_append_val (argvlen, len);
            }
          added = redisCommandArgv (c, (int) argv->len, (const char **) argv->pdata,
                                    (const size_t *) (gpointer) argvlen->data);
          g_assert_nonnull (added);
          g_assert_cmpint (added->type, ==, REDIS_REPLY_STRING);
          freeReplyObject (added);
          copied++;
        }
      freeReplyObject (tail);
    }
  redisFree (c);
  return copied;
}

/* Runs @name's jobs in this process until none is left; checks each key's
 * ran once each, in order, and returns the consumer's counters. */
static void
run_all_once (Server            *server,
              const char        *name,
              guint              n_shards,
              Jobs              *jobs,
              KdRedisQueueStats *stats)
{
  Seen seen;
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, n_shards);

  seen_init (&seen);
  run_until_done (queue, 4, &seen);
  kd_redis_queue_get_stats (queue, stats);

  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, jobs->total);
  g_assert_cmpuint (stats->acked, ==, jobs->total);
  seen_clear (&seen);
}

static void
test_producer_copies (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) producer = NULL;
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GError) error = NULL;
  GRand *rand = g_rand_new_with_seed (11);
  Jobs jobs = { 20, g_new0 (guint, 20), 0 };
  KdRedisQueueStats stats;
  guint copies;

  g_test_summary ("A job a producer added twice (same producer id and sequence, as after a lost "
                  "reply) runs once, in its key's order, and the copy is acknowledged");
  if (!need_redis ())
    return;

  server_start (&server);
  producer = open_queue (&server, "copies", 4);
  add_numbered (&jobs, 1000, rand, keys, payloads);
  g_assert_true (kd_redis_queue_add_many (producer, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &error));
  g_assert_no_error (error);
  copies = copy_tails (&server, "copies", 4, 30);
  g_ptr_array_set_size (keys, 0);
  g_ptr_array_set_size (payloads, 0);
  add_numbered (&jobs, 1000, rand, keys, payloads);
  g_assert_true (kd_redis_queue_add_many (producer, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &error));
  g_assert_no_error (error);

  run_all_once (&server, "copies", 4, &jobs, &stats);
  g_assert_cmpuint (copies, ==, 4 * 30);
  g_assert_cmpuint (stats.duplicates, ==, copies);

  g_rand_free (rand);
  g_free (jobs.count);
  server_stop (&server);
}

typedef struct
{
  KdRedisQueue *queue;
  GPtrArray    *keys;
  GPtrArray    *payloads;
  gboolean      ok;
  GError       *error;
} Adding;

static gpointer
add_in_thread (gpointer data)
{
  Adding *adding = data;

  adding->ok = kd_redis_queue_add_many (adding->queue, adding->keys->len, (const char **) adding->keys->pdata,
                                        (GBytes **) adding->payloads->pdata, &adding->error);
  return NULL;
}

/* Kills the connection whose name starts with @prefix; returns FALSE if
 * there is none. */
static gboolean
kill_client (Server     *server,
             const char *prefix)
{
  redisContext *c = server_connect (server);
  redisReply *list = redisCommand (c, "CLIENT LIST");
  g_autofree char *needle = g_strdup_printf (" name=%s", prefix);
  const char *at;
  const char *line;
  redisReply *killed;
  long long id;

  g_assert_nonnull (list);
  at = strstr (list->str, needle);
  if (at == NULL)
    {
      freeReplyObject (list);
      redisFree (c);
      return FALSE;
    }
  for (line = at; line > list->str && line[-1] != '\n'; line--)
    ;
  g_assert_cmpint (sscanf (line, "id=%lld", &id), ==, 1);
  freeReplyObject (list);
  killed = redisCommand (c, "CLIENT KILL ID %lld", id);
  g_assert_nonnull (killed);
  g_assert_cmpint (killed->integer, ==, 1);
  freeReplyObject (killed);
  redisFree (c);
  return TRUE;
}

static void
test_producer_retry (void)
{
  Server server = { 0 };
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  GRand *rand = g_rand_new_with_seed (13);
  Jobs jobs = { 100, g_new0 (guint, 100), 0 };
  Adding adding = { 0 };
  KdRedisQueueStats stats;
  GThread *thread;
  redisContext *c;
  redisReply *first;
  guint64 copies;
  gboolean killed_idle;
  char *big;
  void (*was) (int);
  guint i;

  g_test_summary ("A producer whose connection is killed while it adds sends again the jobs whose "
                  "replies it lost, under the same ids: each job runs once; writing into a "
                  "connection Redis closed raises no SIGPIPE that would kill the process, nor "
                  "loses a chunk of a later add");
  if (!need_redis ())
    return;

  /* GIO ignores SIGPIPE in the whole process (when its GSocket class, which
   * free_port() uses, is first made); the library must not count on it. */
  server_start (&server);
  was = signal (SIGPIPE, SIG_DFL);
  adding.queue = open_queue (&server, "retry", 4);
  add_numbered (&jobs, scaled (100000), rand, keys, payloads);
  adding.keys = keys;
  adding.payloads = payloads;
  thread = g_thread_new ("adding", add_in_thread, &adding);

  /* Killed once Redis stored its first job, while it sends the rest. */
  c = server_connect (&server);
  first = redisCommand (c, "XREAD BLOCK %d STREAMS retry:{0} retry:{1} retry:{2} retry:{3} retry:{u} 0 0 0 0 0",
                        (int) (KD_REDIS_TEST_DEADLINE_US / 1000));
  g_assert_nonnull (first);
  g_assert_cmpint (first->type, ==, REDIS_REPLY_ARRAY);
  freeReplyObject (first);
  redisFree (c);
  g_assert_true (kill_client (&server, "kd:retry:producer:"));
  g_thread_join (thread);
  g_assert_no_error (adding.error);
  g_assert_true (adding.ok);

  g_test_message ("%" G_GUINT64_FORMAT " jobs stored twice",
                  streams_length (&server.place, "retry", 4) - jobs.total);

  /* Killed while idle: the next add writes more than the socket takes at
   * once, into a connection Redis closed (EPIPE, and SIGPIPE). The
   * connection the producer made again after the kill above is killed
   * now; there is none if the add had sent everything before that kill,
   * which then closed the connection, idle already. Either way, the
   * producer's connection is one Redis closed while it was idle. */
  killed_idle = kill_client (&server, "kd:retry:producer:");
  g_test_message ("the first kill came %s the add had sent everything", killed_idle ? "before" : "after");
  g_ptr_array_set_size (keys, 0);
  g_ptr_array_set_size (payloads, 0);
  big = g_malloc0 (16 << 20);
  big[0] = '1';
  g_ptr_array_add (keys, g_strdup ("big"));
  g_ptr_array_add (payloads, g_bytes_new_take (big, 16 << 20));
  jobs.total++;
  g_assert_true (kd_redis_queue_add_many (adding.queue, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &adding.error));
  g_assert_no_error (adding.error);

  /* Killed while idle once more, then an add of several chunks whose first
   * write (4 MiB, more than the socket takes) fails: every job is stored, in its key's order (a connection made
   * again within the add would read the next chunk's replies as those of
   * the chunk lost, and count that one stored). */
  g_assert_true (kill_client (&server, "kd:retry:producer:"));
  g_ptr_array_set_size (keys, 0);
  g_ptr_array_set_size (payloads, 0);
  for (i = 0; i < 2000; i++)
    {
      guint k = (guint) g_rand_int_range (rand, 0, (gint32) jobs.n_keys);
      char *text = g_malloc (8192);
      gint len = g_snprintf (text, 8192, "%u", ++jobs.count[k]);

      memset (text + len, ' ', 8192 - (gsize) len);
      g_ptr_array_add (keys, g_strdup_printf ("key-%u", k));
      g_ptr_array_add (payloads, g_bytes_new_take (text, 8192));
    }
  jobs.total += 2000;
  g_assert_true (kd_redis_queue_add_many (adding.queue, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &adding.error));
  g_assert_no_error (adding.error);
  copies = streams_length (&server.place, "retry", 4) - jobs.total;

  run_all_once (&server, "retry", 4, &jobs, &stats);
  g_assert_cmpuint (stats.duplicates, ==, copies);

  g_object_unref (adding.queue);
  g_rand_free (rand);
  g_free (jobs.count);
  signal (SIGPIPE, was);
  server_stop (&server);
}

/* ---- Across processes -------------------------------------------------- */


static void
test_workers (void)
{
  Server server = { 0 };
  Worker *workers[3];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 refused, claimed, trimmed;
  guint w;

  g_test_summary ("3 worker processes run 100,000 jobs over 1,000 keys: all of them, each key's "
                  "in order, nothing lost; the ones that join while others run jobs take their "
                  "shards over without a job running twice; the streams are trimmed empty");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "jobs", 64, scaled (100000), 1000, &jobs);
  /* Nothing is taken over, refused or run twice only if no stall reaches
   * the margin of a third of the lease (a loaded CI machine, sanitizers,
   * an AOF fsync): a lease of 10 s makes one implausible, and shards move
   * here by release, never by a lease expiring. */
  for (w = 0; w < 3; w++)
    {
      workers[w] = worker_start (&server, "jobs", w, "--lease-ms=10000", "--batch=256", NULL);
      wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total * (w + 1) / 10);
    }
  wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total);
  /* Every job acknowledged: the shards' owners trim their streams empty. */
  wait_trimmed (&server.place, "jobs", 64, 0);
  finish_workers (workers, 3, -1);
  refused = workers_stat (workers, 3, "refused");
  claimed = workers_stat (workers, 3, "claimed");
  trimmed = workers_stat (workers, 3, "trimmed");
  /* Each entry was trimmed once, by a worker. */
  g_assert_cmpuint (trimmed, ==, jobs.total);

  check_logs (workers, 3, &jobs, G_MAXUINT, 0, &verdict);
  g_test_message ("%" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " duplicates, %"
                  G_GUINT64_FORMAT " taken over, %" G_GUINT64_FORMAT " late acks refused",
                  verdict.runs, verdict.duplicates, claimed, refused);
  /* Shards move between live workers only once drained (nothing of them
   * in flight, no read of them under way), and a live worker keeps its
   * leases: nothing is left to take over, nothing is refused, nothing
   * reruns. */
  g_assert_cmpuint (claimed, ==, 0);
  g_assert_cmpuint (refused, ==, 0);
  g_assert_cmpuint (verdict.duplicates, ==, 0);

  for (w = 0; w < 3; w++)
    worker_free (workers[w]);
  g_free (jobs.count);
  server_stop (&server);
}

/* 3 workers run 100,000 jobs over 1,000 keys, one killed in the middle,
 * on a server of their own (over TLS with @tls). */
static void
kill_one_worker (gboolean tls)
{
  Server server = { .tls = tls };
  Worker *workers[3];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 claimed, held;
  const guint batch = 256;
  guint w;

  server_start (&server);
  produce (&server, "jobs", 64, scaled (100000), 1000, &jobs);
  for (w = 0; w < 3; w++)
    workers[w] = worker_start (&server, "jobs", w, "--lease-ms=1000", "--batch=256", "--work-us=20", NULL);
  wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total * 3 / 10);
  wait_holding (&server.place, "jobs", 64, workers[1]);
  worker_signal (workers[1], SIGKILL);
  /* What the dead worker held when it died, read and not acknowledged:
   * usually some (it held some a moment ago), 0 if it acknowledged them
   * all just before the signal landed. (Waited for: a dead process sends
   * nothing more.) */
  g_subprocess_wait (workers[1]->process, NULL, NULL);
  held = consumer_pending (&server.place, "jobs", 64, workers[1]->name);
  wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total);
  /* Gone, and holding nothing once taken over: the owners forget it in
   * every group. */
  wait_forgotten (&server.place, "jobs", 64, workers[1]->name);
  finish_workers (workers, 3, 1);
  claimed = workers_stat (workers, 3, "claimed");

  check_logs (workers, 3, &jobs, G_MAXUINT, 0, &verdict);
  g_test_message ("%" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " held by the killed worker, %"
                  G_GUINT64_FORMAT " taken over, %" G_GUINT64_FORMAT " duplicates after the kill "
                  "(bound: the batch, %u)", verdict.runs, held, claimed, verdict.duplicates, batch);
  /* Everything it held was taken over by the others (had it not been,
   * wait_finished() would have failed at its deadline). */
  if (held > 0)
    g_assert_cmpuint (claimed, >, 0);
  g_assert_cmpuint (verdict.duplicates, <=, batch);

  for (w = 0; w < 3; w++)
    worker_free (workers[w]);
  g_free (jobs.count);
  server_stop (&server);
}

static void
test_kill (void)
{
  g_test_summary ("A worker killed with SIGKILL in the middle: its shards are taken over, nothing "
                  "is lost, each key keeps its order, at most a batch of jobs runs twice, and the "
                  "dead worker is forgotten in every group");
  if (!need_redis ())
    return;
  kill_one_worker (FALSE);
}

static void
test_kill_over_tls (void)
{
  g_test_summary ("The same over TLS, with client certificates: 3 worker processes run 100,000 "
                  "jobs, one killed in the middle, nothing lost, each key in order, at most a "
                  "batch of duplicates");
  if (!need_tls ())
    return;
  kill_one_worker (TRUE);
}

/* Counts, from the workers' logs, the runs of unkeyed jobs numbered 1 to
 * @total: each must have completed at least once; returns the runs beyond
 * the first. */
static guint64
check_unkeyed_logs (Worker **workers,
                    guint    n_workers,
                    guint    total)
{
  g_autofree guint *runs = g_new0 (guint, total + 1);
  guint64 duplicates = 0;
  guint w, i;

  for (w = 0; w < n_workers; w++)
    {
      g_autofree char *text = NULL;
      g_auto (GStrv) lines = NULL;

      if (!g_file_get_contents (workers[w]->log, &text, NULL, NULL))
        continue;
      lines = g_strsplit (text, "\n", -1);
      for (i = 0; lines[i] != NULL; i++)
        {
          gint64 start, end;
          guint number, attempt;
          char key[64], status[8];

          if (lines[i][0] == '\0')
            continue;
          g_assert_cmpint (sscanf (lines[i], "%" G_GINT64_FORMAT " %" G_GINT64_FORMAT " %63s %u %u %7s", &start,
                                   &end, key, &number, &attempt, status), ==, 6);
          g_assert_cmpstr (key, ==, "-");
          g_assert_cmpstr (status, ==, "ok");
          g_assert_cmpuint (number, >=, 1);
          g_assert_cmpuint (number, <=, total);
          if (runs[number]++ > 0)
            duplicates++;
        }
    }
  for (i = 1; i <= total; i++)
    if (runs[i] == 0)
      g_error ("unkeyed job %u of %u never ran: lost", i, total);
  return duplicates;
}

static void
test_kill_unkeyed (void)
{
  Server server = { 0 };
  Worker *workers[2];
  g_autoptr (KdRedisQueue) producer = NULL;
  g_autoptr (GPtrArray) keys = g_ptr_array_new ();
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GError) error = NULL;
  guint64 held, claimed, duplicates;
  const guint batch = 256;
  guint total = scaled (20000), i, w;

  g_test_summary ("A worker killed with SIGKILL while it runs unkeyed jobs: the entries it held are "
                  "taken over once idle for two leases, none is lost, at most a batch runs twice");
  if (!need_redis ())
    return;

  server_start (&server);
  producer = open_queue (&server, "jobs", 64);
  for (i = 1; i <= total; i++)
    {
      char *text = g_strdup_printf ("%u", i);

      g_ptr_array_add (keys, NULL);
      g_ptr_array_add (payloads, g_bytes_new_take (text, strlen (text)));
    }
  g_assert_true (kd_redis_queue_add_many (producer, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &error));
  g_assert_no_error (error);
  for (w = 0; w < 2; w++)
    workers[w] = worker_start (&server, "jobs", w, "--lease-ms=1000", "--batch=256", "--work-us=50", NULL);
  wait_finished (&server.place, "jobs", 64, total, total / 10);
  wait_holding (&server.place, "jobs", 64, workers[1]);
  worker_signal (workers[1], SIGKILL);
  g_subprocess_wait (workers[1]->process, NULL, NULL);
  held = consumer_pending (&server.place, "jobs", 64, workers[1]->name);
  wait_finished (&server.place, "jobs", 64, total, total);
  finish_workers (workers, 2, 1);
  claimed = stat_of (workers[0]->out, "claimed");

  duplicates = check_unkeyed_logs (workers, 2, total);
  g_test_message ("%" G_GUINT64_FORMAT " held by the killed worker, %" G_GUINT64_FORMAT " taken over, %"
                  G_GUINT64_FORMAT " duplicates (bound: the batch, %u)", held, claimed, duplicates, batch);
  g_assert_cmpuint (claimed, >=, held);
  g_assert_cmpuint (duplicates, <=, batch);

  for (w = 0; w < 2; w++)
    worker_free (workers[w]);
  server_stop (&server);
}

/* How many runs in @worker's log started at @time or later. */
static guint
runs_started_after (Worker *worker,
                    gint64  time)
{
  g_autofree char *text = NULL;
  g_auto (GStrv) lines = NULL;
  guint i, n = 0;

  g_assert_true (g_file_get_contents (worker->log, &text, NULL, NULL));
  lines = g_strsplit (text, "\n", -1);
  for (i = 0; lines[i] != NULL; i++)
    if (lines[i][0] != '\0' && g_ascii_strtoll (lines[i], NULL, 10) >= time)
      n++;
  return n;
}

static void
test_freeze (void)
{
  Server server = { 0 };
  Worker *workers[2];
  g_autoptr (GError) error = NULL;
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 refused, skipped;
  gint64 resumed;
  guint late, w;
  char *line;

  g_test_summary ("A worker frozen (SIGSTOP) past its lease, then resumed: the other takes its "
                  "shards over, its late acknowledgements are refused, it starts nothing more, "
                  "nothing is lost, and the reruns carry another fencing token");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "jobs", 64, scaled (100000), 1000, &jobs);
  /* The first freezes itself inside its 2,000th job (of about half the
   * jobs): one of its jobs is under way, and its acknowledgement is late
   * for sure. */
  workers[0] = worker_start (&server, "jobs", 0, "--lease-ms=1000", "--batch=256", "--workers=2",
                             "--stop-at=2000", NULL);
  workers[1] = worker_start (&server, "jobs", 1, "--lease-ms=1000", "--batch=256", NULL);
  line = g_data_input_stream_read_line_utf8 (workers[0]->stdout_lines, NULL, NULL, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (line, ==, "redis-worker: stopping inside job 2000");
  g_free (line);
  wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total);
  resumed = g_get_monotonic_time ();
  worker_signal (workers[0], SIGCONT);
  finish_workers (workers, 2, -1);
  refused = workers_stat (workers, 2, "refused");
  skipped = workers_stat (workers, 2, "skipped");

  check_logs (workers, 2, &jobs, G_MAXUINT, 0, &verdict);
  late = runs_started_after (workers[0], resumed);
  g_test_message ("%" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " duplicates, %" G_GUINT64_FORMAT
                  " late acknowledgements refused, %" G_GUINT64_FORMAT " entries skipped, %u runs "
                  "started after the resume", verdict.runs, verdict.duplicates, refused, skipped, late);
  /* Every job had finished elsewhere: the resumed worker must not start
   * any. A run is stamped as the handler starts, just after the library
   * checked that it may start: the other worker thread may have been
   * frozen between the two, and log one run stamped after the resume
   * (one per worker thread but the one frozen inside its job). */
  g_assert_cmpuint (late, <=, 1);
  g_assert_cmpuint (refused, >, 0);
  g_assert_cmpuint (verdict.duplicates, <=, 256);
  /* The job under way when it froze ran again on the next owner, under
   * another fencing token (check_logs() checks every such pair). */
  g_assert_cmpuint (verdict.fenced_reruns, >=, 1);

  for (w = 0; w < 2; w++)
    worker_free (workers[w]);
  g_free (jobs.count);
  server_stop (&server);
}

static void
test_redis_restart (void)
{
  Server server = { .fsync_always = TRUE };
  Worker *workers[2];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint w;

  g_test_summary ("redis-server killed with SIGKILL in the middle and restarted from its AOF: "
                  "the workers reconnect, nothing is lost, each key keeps its order");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "jobs", 64, scaled (100000), 1000, &jobs);
  for (w = 0; w < 2; w++)
    workers[w] = worker_start (&server, "jobs", w, "--lease-ms=1000", "--batch=256", NULL);
  wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total * 3 / 10);
  server_kill (&server);
  server_launch (&server);
  wait_finished (&server.place, "jobs", 64, jobs.total, jobs.total);
  finish_workers (workers, 2, -1);

  check_logs (workers, 2, &jobs, G_MAXUINT, 0, &verdict);
  g_test_message ("%" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " duplicates across the restart",
                  verdict.runs, verdict.duplicates);
  g_assert_cmpuint (verdict.duplicates, <=, 2 * 256);

  for (w = 0; w < 2; w++)
    worker_free (workers[w]);
  g_free (jobs.count);
  server_stop (&server);
}

static void
test_dead_letter (void)
{
  Server server = { 0 };
  Worker *workers[1];
  Jobs jobs = { 0 };
  Verdict verdict;
  redisContext *c;
  redisReply *reply;
  gsize i, f;

  g_test_summary ("The jobs of a key that always fails end in the dead-letter stream after 3 "
                  "attempts each, acknowledged; the other keys run");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "jobs", 16, 1000, 10, &jobs);
  workers[0] = worker_start (&server, "jobs", 0, "--shards=16", "--lease-ms=2000", "--attempts=3",
                             "--retry-ms=1", "--fail-key=key-3", NULL);
  wait_finished (&server.place, "jobs", 16, jobs.total, jobs.total);
  finish_workers (workers, 1, -1);

  /* key-3's runs are failures: checked apart. */
  check_logs (workers, 1, &jobs, 3, 3, &verdict);
  g_assert_cmpuint (verdict.duplicates, ==, 0);

  c = server_connect (&server);
  g_assert_nonnull (c);
  reply = redisCommand (c, "XRANGE jobs:dead - +");
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
  g_assert_cmpuint (reply->elements, ==, jobs.count[3]);
  for (i = 0; i < reply->elements; i++)
    {
      redisReply *fields = reply->element[i]->element[1];
      const char *key = NULL;
      guint seq = 0, tries = 0;

      for (f = 0; f + 1 < fields->elements; f += 2)
        {
          if (strcmp (fields->element[f]->str, "k") == 0)
            key = fields->element[f + 1]->str;
          else if (strcmp (fields->element[f]->str, "p") == 0)
            seq = (guint) atoi (fields->element[f + 1]->str);
          else if (strcmp (fields->element[f]->str, "attempts") == 0)
            tries = (guint) atoi (fields->element[f + 1]->str);
        }
      g_assert_cmpstr (key, ==, "key-3");
      g_assert_cmpuint (tries, ==, 3);
      /* In the key's order, once each. */
      g_assert_cmpuint (seq, ==, i + 1);
    }
  freeReplyObject (reply);
  redisFree (c);

  worker_free (workers[0]);
  g_free (jobs.count);
  server_stop (&server);
}

static void
test_long_log_line (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (GError) error = NULL;
  g_autoptr (GBytes) payload = NULL;
  g_autofree char *key = NULL;
  g_autofree char *text = NULL;
  g_autofree char *log = NULL;
  g_auto (GStrv) fields = NULL;
  Worker *workers[1];
  gsize size = 1024 * 1024, length;

  g_test_summary ("redis-worker --log writes the whole line of a job whose key and payload are "
                  "far longer than a line buffer: a 300-byte key and a 1 MiB payload");
  if (!need_redis ())
    return;

  server_start (&server);
  key = g_strnfill (300, 'k');
  text = g_strnfill (size, 'p');
  payload = g_bytes_new_static (text, size);
  queue = open_queue (&server, "long", 4);
  g_assert_true (kd_redis_queue_add (queue, key, payload, &error));
  g_assert_no_error (error);

  workers[0] = worker_start (&server, "long", 0, "--shards=4", NULL);
  wait_finished (&server.place, "long", 4, 1, 1);
  finish_workers (workers, 1, -1);

  g_assert_true (g_file_get_contents (workers[0]->log, &log, &length, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (length, >, size);
  g_assert_cmpint (log[length - 1], ==, '\n');
  log[length - 1] = '\0';
  g_assert_null (strchr (log, '\n'));   /* one line */
  fields = g_strsplit (log, " ", -1);
  g_assert_cmpuint (g_strv_length (fields), ==, 7);
  g_assert_cmpstr (fields[2], ==, key);
  g_assert_cmpuint (strlen (fields[3]), ==, size);
  g_assert_true (strspn (fields[3], "p") == size);
  g_assert_cmpstr (fields[4], ==, "1");
  g_assert_cmpstr (fields[5], ==, "ok");
  g_assert_cmpuint (g_ascii_strtoull (fields[6], NULL, 10), >=, 1);

  worker_free (workers[0]);
  g_clear_object (&queue);
  server_stop (&server);
}

static gboolean
complete_job (KdJob    *job,
              gpointer  user_data,
              GError  **error)
{
  return TRUE;
}

static void
expect_critical (const char *what)
{
  g_autofree char *pattern = g_strdup_printf ("*%s*", what);

  g_test_expect_message ("kdispatch", G_LOG_LEVEL_CRITICAL, pattern);
}

static void
test_out_of_range (void)
{
  g_autoptr (KdRedisQueue) queue = kd_redis_queue_new ("range");

  g_test_summary ("Every count and time given to a queue is range-checked with a critical that "
                  "leaves the setting as it was; the largest ones that are taken do not overflow");
  if (!g_test_undefined ())
    return;

  expect_critical ("port > 0");
  kd_redis_queue_set_address (queue, "127.0.0.1", 65536);
  expect_critical ("n_shards >= 1");
  kd_redis_queue_set_n_shards (queue, 65537);
  expect_critical ("lease_us >= 30");
  kd_redis_queue_set_lease_time (queue, 1);
  expect_critical ("lease_us <= KD_REDIS_QUEUE_MAX_LEASE_US");
  kd_redis_queue_set_lease_time (queue, G_MAXINT64);
  expect_critical ("batch_size >= 1");
  kd_redis_queue_set_batch_size (queue, KD_REDIS_QUEUE_MAX_BATCH_SIZE + 1);
  expect_critical ("max_attempts >= 1");
  kd_redis_queue_set_retry (queue, 0, 0, 0);
  expect_critical ("n_workers <= KD_DISPATCHER_MAX_WORKERS");
  g_assert_null (kd_redis_queue_new_dispatcher (queue, (guint) -1, complete_job, NULL, NULL));
  g_test_assert_expected_messages ();

  g_assert_cmpuint (kd_redis_queue_get_n_shards (queue), ==, 64);
  g_assert_cmpuint (kd_redis_queue_get_batch_size (queue), ==, 1024);
  kd_redis_queue_set_lease_time (queue, KD_REDIS_QUEUE_MAX_LEASE_US);
  kd_redis_queue_set_batch_size (queue, KD_REDIS_QUEUE_MAX_BATCH_SIZE);
  g_assert_cmpuint (kd_redis_queue_get_batch_size (queue), ==, KD_REDIS_QUEUE_MAX_BATCH_SIZE);
}

static void
test_thread_limit (void)
{
  Server server = { 0 };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (GError) error = NULL;
  g_autoptr (GBytes) payload = g_bytes_new_static ("1", 1);
  KdDispatcher *dispatcher;
  guint extra;

  g_test_summary ("kd_redis_queue_start() with no thread to be had for its lease, acker or "
                  "reader thread fails with G_THREAD_ERROR_AGAIN, having stopped the ones it made; "
                  "once threads can be made it starts and runs jobs");
  if (!need_redis ())
    return;
  if (!g_test_subprocess ())
    {
      g_test_trap_subprocess (NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
      g_test_trap_assert_passed ();
      return;
    }

  /* Everything that makes threads of its own (the server's child watch,
   * the workers) first. */
  server_start (&server);
  queue = open_queue (&server, "limited", 4);
  dispatcher = kd_redis_queue_new_dispatcher (queue, 2, complete_job, NULL, NULL);
  g_assert_true (kd_dispatcher_start (dispatcher, &error));
  g_assert_true (kd_redis_queue_add (queue, "k", payload, &error));

  for (extra = 0; extra < 3; extra++)
    {
      kd_test_limit_threads (extra);
      g_assert_false (kd_redis_queue_start (queue, &error));
      g_assert_error (error, G_THREAD_ERROR, G_THREAD_ERROR_AGAIN);
      g_test_message ("%u threads to be had: %s", extra, error->message);
      g_clear_error (&error);
      kd_test_unlimit_threads ();
    }

  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  kd_redis_queue_stop (queue);
  g_object_unref (dispatcher);
  g_clear_object (&queue);
  server_stop (&server);
}

static void
test_bench (void)
{
  Server server = { 0 };
  g_autoptr (GSubprocess) bench = NULL;
  g_autoptr (GError) error = NULL;
  g_autofree char *port = NULL;
  g_autofree char *out = NULL;
  Jobs jobs = { 0 };
  Progress progress;

  g_test_summary ("redis-worker --bench adds its jobs, runs them with 2 worker processes until the "
                  "queue's backlog is empty, and says so");
  if (!need_redis ())
    return;

  server_start (&server);
  port = g_strdup_printf ("--port=%u", server.port);
  bench = g_subprocess_new (G_SUBPROCESS_FLAGS_STDOUT_PIPE, &error, g_getenv ("KD_REDIS_WORKER"), port,
                            "--name=bench", "--bench=5000", "--consumers=2", NULL);
  g_assert_no_error (error);
  g_subprocess_communicate_utf8 (bench, NULL, NULL, &out, NULL, &error);
  g_assert_no_error (error);
  g_test_message ("%s", out);
  g_assert_true (g_subprocess_get_if_exited (bench));
  g_assert_cmpint (g_subprocess_get_exit_status (bench), ==, 0);
  g_assert_nonnull (strstr (out, "added 5000 jobs"));
  g_assert_nonnull (strstr (out, "ran 5000 jobs"));
  queue_progress (&server.place, "bench", 64, &progress);
  g_assert_cmpuint (progress.entries, <=, 5000);
  g_assert_cmpuint (progress.unfinished, ==, 0);

  /* A queue with unfinished jobs would skew the figures: refused. */
  g_clear_object (&bench);
  g_clear_pointer (&out, g_free);
  produce (&server, "full", 64, 10, 2, &jobs);
  bench = g_subprocess_new (G_SUBPROCESS_FLAGS_STDOUT_SILENCE | G_SUBPROCESS_FLAGS_STDERR_PIPE, &error,
                            g_getenv ("KD_REDIS_WORKER"), port, "--name=full", "--bench=10", NULL);
  g_assert_no_error (error);
  g_subprocess_communicate_utf8 (bench, NULL, NULL, NULL, &out, &error);
  g_assert_no_error (error);
  g_assert_cmpint (g_subprocess_get_exit_status (bench), ==, 1);
  g_assert_nonnull (strstr (out, "holds 10 unfinished jobs"));
  g_free (jobs.count);

  server_stop (&server);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  find_redis_server ();
  g_assert_nonnull (g_getenv ("KD_REDIS_WORKER"));

  g_test_add_func ("/kd/redis-queue/deadline-fence", test_deadline_fence);
  g_test_add_func ("/kd/redis-queue/in-process", test_in_process);
  g_test_add_func ("/kd/redis-queue/closed", test_closed);
  g_test_add_func ("/kd/redis-queue/workers", test_workers);
  g_test_add_func ("/kd/redis-queue/kill", test_kill);
  g_test_add_func ("/kd/redis-queue/kill-over-tls", test_kill_over_tls);
  g_test_add_func ("/kd/redis-queue/kill-unkeyed", test_kill_unkeyed);
  g_test_add_func ("/kd/redis-queue/freeze", test_freeze);
  g_test_add_func ("/kd/redis-queue/redis-restart", test_redis_restart);
  g_test_add_func ("/kd/redis-queue/dead-letter", test_dead_letter);
  g_test_add_func ("/kd/redis-queue/dispatcher-retry", test_dispatcher_retry);
  g_test_add_func ("/kd/redis-queue/park-refused", test_park_refused);
  g_test_add_func ("/kd/redis-queue/trim", test_trim);
  g_test_add_func ("/kd/redis-queue/stop-unreachable", test_stop_unreachable);
  g_test_add_func ("/kd/redis-queue/producer-copies", test_producer_copies);
  g_test_add_func ("/kd/redis-queue/producer-retry", test_producer_retry);
  g_test_add_func ("/kd/redis-queue/oversized", test_oversized);
  g_test_add_func ("/kd/redis-queue/other-shards", test_other_shards);
  g_test_add_func ("/kd/redis-queue/bad-stream", test_bad_stream);
  g_test_add_func ("/kd/redis-queue/forget-past-refused-stream", test_forget_past_refused_stream);
  g_test_add_func ("/kd/redis-queue/fencing-tokens", test_fencing_tokens);
  g_test_add_func ("/kd/redis-queue/long-log-line", test_long_log_line);
  g_test_add_func ("/kd/redis-queue/out-of-range", test_out_of_range);
  g_test_add_func ("/kd/redis-queue/thread-limit", test_thread_limit);
  g_test_add_func ("/kd/redis-queue/bench", test_bench);

  return g_test_run ();
}
