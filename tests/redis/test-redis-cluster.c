/* test-redis-cluster.c: KdRedisQueue on a real Redis Cluster, with worker processes and a failover
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each case starts its own cluster of 3 masters and 3 replicas on
 * 127.0.0.1 and stops it afterwards (kd-redis-cluster-harness.c); queues
 * and workers reach it by its URL, redis+cluster://127.0.0.1:PORT. The
 * cross-process cases run worker processes, whose logs tell whether every
 * job ran, in its key's order, and how many ran twice (check_logs(),
 * kd-redis-harness.c).
 *
 * Skipped, with the reason, only when redis-server or redis-cli is not
 * installed.
 */

#include "config.h"

#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>
#include <signal.h>
#include <string.h>

#include "kd-redis-cluster-harness.h"
#include "kd-redis-harness.h"
/* Its locks, which ThreadSanitizer sees (GLib's futexes it does not). */
#include "kd-sync-private.h"
#include "kd-test-util.h"

/* ---- In one process ---------------------------------------------------- */

static void
test_in_process (void)
{
  Cluster cluster;
  Seen seen;
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;
  KdRedisQueueStats stats;
  Progress progress;
  Jobs jobs = { 0 };
  guint streams_on[CLUSTER_NODES] = { 0 };
  guint64 entries_on[CLUSTER_NODES] = { 0 };
  guint64 backlog, entries = 0;
  guint i, node, n_masters = 0;
  gint shard;

  g_test_summary ("One process adds keyed and unkeyed jobs to a queue on a Redis Cluster and runs "
                  "them all, each key's in order, and acknowledges every one; the backlog counts "
                  "them down; the shards' streams are spread over the 3 masters");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  seen_init (&seen);

  cluster_produce (&cluster, "inproc", 64, 2000, 20, &jobs);
  queue = cluster_open_queue (&cluster, "inproc", 64);
  g_assert_cmpuint (kd_redis_queue_get_n_shards (queue), ==, 64);
  /* Every job runs once, in order, only if no stall reaches the margin of
   * a third of the lease: a lease of 10 s makes one implausible, and
   * nothing here waits for a lease to expire. */
  kd_redis_queue_set_lease_time (queue, 10 * G_USEC_PER_SEC);
  kd_redis_queue_set_batch_size (queue, 64);
  for (i = 0; i < 100; i++)
    {
      g_autofree char *text = g_strdup_printf ("%u", i);
      g_autoptr (GBytes) payload = g_bytes_new (text, strlen (text));

      g_assert_true (kd_redis_queue_add (queue, NULL, payload, &error));
      g_assert_no_error (error);
    }

  /* Each stream is on the master serving its slot, and holds its jobs
   * there; the shards' slots fall on every master. */
  for (shard = -1; shard < 64; shard++)
    {
      g_autofree char *stream = stream_name ("inproc", shard);
      redisContext *c = cluster_connect_key (&cluster, stream, &node);
      redisReply *reply = redisCommand (c, "TYPE %s", stream);

      g_assert_nonnull (reply);
      if (strcmp (reply->str, "stream") == 0)
        streams_on[node]++;
      freeReplyObject (reply);
      reply = redisCommand (c, "XLEN %s", stream);
      g_assert_nonnull (reply);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_INTEGER);
      entries_on[node] += (guint64) reply->integer;
      entries += (guint64) reply->integer;
      freeReplyObject (reply);
      redisFree (c);
    }
  for (node = 0; node < CLUSTER_NODES; node++)
    {
      if (streams_on[node] == 0)
        continue;
      n_masters++;
      g_test_message ("node %u: %u streams, %" G_GUINT64_FORMAT " entries", node, streams_on[node],
                      entries_on[node]);
    }
  g_assert_cmpuint (entries, ==, jobs.total + 100);
  g_assert_cmpuint (n_masters, ==, CLUSTER_MASTERS);

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
  g_assert_no_error (error);
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
  queue_progress (&cluster.place, "inproc", 64, &progress);
  g_assert_cmpuint (progress.entries, <=, jobs.total + 100);
  g_assert_cmpuint (progress.unfinished, ==, 0);

  g_clear_object (&dispatcher);
  g_clear_object (&queue);
  seen_clear (&seen);
  g_free (jobs.count);
  cluster_stop (&cluster);
}

static void
test_manual_failover (void)
{
  Cluster cluster;
  Seen seen;
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (GError) error = NULL;
  g_autofree char *stream = stream_name ("mf", 0);
  Jobs jobs = { 0 };
  guint64 backlog, trimmed;
  guint promoted;

  g_test_summary ("After an operator hands a master's slots over to its replica (CLUSTER "
                  "FAILOVER), a queue that knew the old map counts, runs and trims its jobs "
                  "on the new one: the redirections it gets (MOVED) make it read the map "
                  "again, not fail");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  seen_init (&seen);
  queue = cluster_open_queue (&cluster, "mf", 64);
  kd_redis_queue_set_lease_time (queue, 10 * G_USEC_PER_SEC);
  produce_into (queue, 2000, 20, &jobs);
  g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (backlog, ==, jobs.total);

  promoted = cluster_failover (&cluster, stream);
  g_assert_cmpuint (cluster_master_of (&cluster, stream), ==, promoted);

  /* The queue's connections still go to the old master for these slots. */
  g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (backlog, ==, jobs.total);
  run_until_done (queue, 4, &seen);
  kd_mutex_lock (&seen.lock);
  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, jobs.total);
  kd_mutex_unlock (&seen.lock);
  g_assert_true (kd_redis_queue_trim (queue, &trimmed, &error));
  g_assert_no_error (error);

  seen_clear (&seen);
  g_free (jobs.count);
  g_clear_object (&queue);
  cluster_stop (&cluster);
}

static void
set_user (redisContext       *c,
          const char         *user,
          const char         *password,
          const char * const *rules,
          guint               n_rules)
{
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  redisReply *reply;
  guint i;

  g_ptr_array_add (argv, g_strdup ("ACL"));
  g_ptr_array_add (argv, g_strdup ("SETUSER"));
  g_ptr_array_add (argv, g_strdup (user));
  g_ptr_array_add (argv, g_strdup ("on"));
  g_ptr_array_add (argv, g_strdup_printf (">%s", password));
  g_ptr_array_add (argv, g_strdup ("resetkeys"));
  g_ptr_array_add (argv, g_strdup ("~acl:*"));
  g_ptr_array_add (argv, g_strdup ("resetchannels"));
  g_ptr_array_add (argv, g_strdup ("&acl:*"));
  g_ptr_array_add (argv, g_strdup ("-@all"));
  for (i = 0; i < n_rules; i++)
    g_ptr_array_add (argv, g_strdup (rules[i]));
  reply = redisCommandArgv (c, (int) argv->len, (const char **) argv->pdata, NULL);
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_STATUS);
  freeReplyObject (reply);
}

static void
test_acl (void)
{
  const char *worker_rules[] = { WORKER_COMMANDS, CLUSTER_COMMANDS };
  const char *producer_rules[] = { PRODUCER_COMMANDS, CLUSTER_COMMANDS, PRODUCER_CLUSTER_COMMANDS };
  Cluster cluster;
  Seen seen;
  g_autoptr (KdRedisQueue) producer = NULL;
  g_autoptr (KdRedisQueue) worker = NULL;
  Jobs jobs = { 0 };
  guint node;

  g_test_summary ("On a Redis Cluster, ACL users with exactly the rules the docs list for a "
                  "producer and a worker on a cluster: the producer adds, waiting for replicas, "
                  "and the worker runs every job, in order");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  /* ACL users are each node's own. */
  for (node = 0; node < CLUSTER_NODES; node++)
    {
      redisContext *c = server_connect (&cluster.nodes[node]);

      g_assert_nonnull (c);
      set_user (c, "kd-producer", "producer-pw", producer_rules, G_N_ELEMENTS (producer_rules));
      set_user (c, "kd-worker", "worker-pw", worker_rules, G_N_ELEMENTS (worker_rules));
      redisFree (c);
    }

  producer = cluster_open_queue (&cluster, "acl", 16);
  kd_redis_queue_set_credentials (producer, "kd-producer", "producer-pw");
  produce_into (producer, 1000, 50, &jobs);

  seen_init (&seen);
  worker = cluster_open_queue (&cluster, "acl", 16);
  kd_redis_queue_set_credentials (worker, "kd-worker", "worker-pw");
  kd_redis_queue_set_lease_time (worker, 10 * G_USEC_PER_SEC);
  run_until_done (worker, 4, &seen);
  kd_mutex_lock (&seen.lock);
  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, jobs.total);
  kd_mutex_unlock (&seen.lock);

  seen_clear (&seen);
  g_free (jobs.count);
  cluster_stop (&cluster);
}

/* Adds jobs of @keys in batches, each key's numbered from 1 (the payload
 * is the number, then spaces up to ADDER_PAYLOAD bytes), until told to
 * stop; counts the batches Redis took, and keeps the first failure. */
typedef struct
{
  KdRedisQueue *queue;
  GMutex        lock;
  GCond         cond;
  guint         batches;
  guint         total;
  gboolean      stop;
  GError       *error;
  char         *keys[100];
  guint         count[100];
} Adder;

#define ADDER_BATCH 100
#define ADDER_PAYLOAD (64 * 1024)

static gpointer
adder_main (gpointer data)
{
  Adder *adder = data;
  GRand *rand = g_rand_new_with_seed (42);

  for (;;)
    {
      g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
      g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
      GError *error = NULL;
      gboolean ok, stop;
      guint i;

      for (i = 0; i < ADDER_BATCH; i++)
        {
          guint k = (guint) g_rand_int_range (rand, 0, G_N_ELEMENTS (adder->count));
          char *text = g_malloc (ADDER_PAYLOAD);
          gint len = g_snprintf (text, ADDER_PAYLOAD, "%u", ++adder->count[k]);

          memset (text + len, ' ', ADDER_PAYLOAD - (gsize) len);
          g_ptr_array_add (keys, g_strdup (adder->keys[k]));
          g_ptr_array_add (payloads, g_bytes_new_take (text, ADDER_PAYLOAD));
        }
      ok = kd_redis_queue_add_many (adder->queue, keys->len, (const char **) keys->pdata,
                                    (GBytes **) payloads->pdata, &error);
      kd_mutex_lock (&adder->lock);
      if (ok)
        {
          adder->batches++;
          adder->total += ADDER_BATCH;
        }
      else
        adder->error = error;
      stop = adder->stop || !ok;
      g_cond_broadcast (&adder->cond);
      kd_mutex_unlock (&adder->lock);
      if (stop)
        break;
    }
  g_rand_free (rand);
  return NULL;
}

/* Waits until the adder took @batches batches, or failed. */
static void
adder_wait (Adder *adder,
            guint  batches)
{
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;

  kd_mutex_lock (&adder->lock);
  while (adder->batches < batches && adder->error == NULL)
    g_assert_true (kd_cond_wait_until (&adder->cond, &adder->lock, deadline));
  g_assert_no_error (adder->error);
  kd_mutex_unlock (&adder->lock);
}

static void
test_add_during_failover (void)
{
  Cluster cluster;
  Adder adder = { 0 };
  Seen seen;
  g_autoptr (KdRedisQueue) consumer = NULL;
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;
  g_autofree char *url = NULL;
  g_autofree char *victim = NULL;
  GThread *thread;
  guint seed, killed, before, i, k;
  gint shard;

  g_test_summary ("Jobs added while the master of their streams dies, with writes its replica "
                  "never got, and it is the seed of the queue's URL: every add succeeds, on the "
                  "promoted replica once the failover is over and the old master is back as its "
                  "replica, and every job it said it added runs, once, in its key's order");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  seen_init (&seen);
  g_mutex_init (&adder.lock);
  g_cond_init (&adder.cond);
  adder.queue = cluster_open_queue (&cluster, "adds", 64);

  /* The node the URL names dies: the queue finds the cluster again from
   * the nodes its map lists. */
  url = cluster_url (&cluster);
  g_assert_cmpint (sscanf (url, "redis+cluster://127.0.0.1:%u", &seed), ==, 1);
  for (shard = 0; shard < 64 && victim == NULL; shard++)
    {
      g_autofree char *stream = stream_name ("adds", shard);

      if (cluster.nodes[cluster_master_of (&cluster, stream)].port == seed)
        victim = g_steal_pointer (&stream);
    }
  g_assert_nonnull (victim);
  /* Keys whose streams are all on that master. */
  for (i = 0, k = 0; k < G_N_ELEMENTS (adder.keys); i++)
    {
      g_autofree char *key = g_strdup_printf ("key-%u", i);
      g_autofree char *stream = stream_name ("adds", (gint) kd_redis_queue_shard_for_key (adder.queue, key));

      if (cluster.nodes[cluster_master_of (&cluster, stream)].port == seed)
        adder.keys[k++] = g_steal_pointer (&key);
    }

  thread = g_thread_new ("adder", adder_main, &adder);
  adder_wait (&adder, 2);
  /* The master dies with 12 MiB of jobs its replica never got (past what
   * the frozen replica's socket takes in): an add that said those were
   * stored would have lost them. With WAIT, the adds meanwhile wait for
   * the replica, time out, and send the jobs again, on the promoted
   * replica once the failover is over. */
  killed = cluster_kill_master_ahead (&cluster, victim, 12 * 1024 * 1024);
  g_assert_cmpuint (cluster_master_of (&cluster, victim), !=, killed);
  /* The promoted replica has no replica of its own, and an add waits for
   * one (the default on a cluster) until the dead master comes back as
   * its replica. */
  g_assert_cmpuint (kd_redis_queue_get_min_replicas (adder.queue), ==, 1);
  cluster_restart_node (&cluster, killed);
  kd_mutex_lock (&adder.lock);
  before = adder.batches;
  kd_mutex_unlock (&adder.lock);
  adder_wait (&adder, before + 2);
  kd_mutex_lock (&adder.lock);
  adder.stop = TRUE;
  kd_mutex_unlock (&adder.lock);
  g_thread_join (thread);
  g_assert_no_error (adder.error);
  g_test_message ("%u jobs added in %u batches, %u of them after the failover", adder.total, adder.batches,
                  adder.batches - before);

  /* Each job an add said it stored is on the promoted replica: it runs. */
  consumer = cluster_open_queue (&cluster, "adds", 64);
  kd_redis_queue_set_lease_time (consumer, 10 * G_USEC_PER_SEC);
  dispatcher = kd_redis_queue_new_dispatcher (consumer, 4, seen_record, &seen, NULL);
  g_assert_true (kd_redis_queue_start (consumer, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (consumer, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_stop (consumer);
  kd_mutex_lock (&seen.lock);
  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, adder.total);
  kd_mutex_unlock (&seen.lock);

  g_clear_object (&dispatcher);
  g_clear_object (&consumer);
  g_clear_object (&adder.queue);
  for (k = 0; k < G_N_ELEMENTS (adder.keys); k++)
    g_free (adder.keys[k]);
  g_mutex_clear (&adder.lock);
  g_cond_clear (&adder.cond);
  seen_clear (&seen);
  cluster_stop (&cluster);
}

/* ---- Across processes -------------------------------------------------- */

static void
test_workers (void)
{
  Cluster cluster;
  Worker *workers[2];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 refused, claimed, trimmed;
  guint w;

  g_test_summary ("2 worker processes run 100,000 jobs over 1,000 keys on a Redis Cluster: all of "
                  "them, each key's in order, nothing lost, none twice; the one that joins while "
                  "the other runs jobs takes its shards over without a job running twice; the "
                  "streams are trimmed empty");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  cluster_produce (&cluster, "jobs", 64, scaled (100000), 1000, &jobs);
  /* Nothing is taken over, refused or run twice only if no stall reaches
   * the margin of a third of the lease: a lease of 10 s makes one
   * implausible, and shards move here by release, never by a lease
   * expiring. */
  for (w = 0; w < 2; w++)
    {
      workers[w] = cluster_worker_start (&cluster, "jobs", w, "--lease-ms=10000", "--batch=256", NULL);
      wait_finished (&cluster.place, "jobs", 64, jobs.total, jobs.total * (w + 1) / 10);
    }
  wait_finished (&cluster.place, "jobs", 64, jobs.total, jobs.total);
  /* Every job acknowledged: the shards' owners trim their streams empty,
   * on whichever master each stream lives. */
  wait_trimmed (&cluster.place, "jobs", 64, 0);
  finish_workers (workers, 2, -1);
  refused = workers_stat (workers, 2, "refused");
  claimed = workers_stat (workers, 2, "claimed");
  trimmed = workers_stat (workers, 2, "trimmed");
  /* Each entry was trimmed once, by a worker. */
  g_assert_cmpuint (trimmed, ==, jobs.total);

  check_logs (workers, 2, &jobs, G_MAXUINT, 0, &verdict);
  g_test_message ("%" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " duplicates, %"
                  G_GUINT64_FORMAT " taken over, %" G_GUINT64_FORMAT " late acks refused",
                  verdict.runs, verdict.duplicates, claimed, refused);
  g_assert_cmpuint (claimed, ==, 0);
  g_assert_cmpuint (refused, ==, 0);
  g_assert_cmpuint (verdict.duplicates, ==, 0);

  for (w = 0; w < 2; w++)
    worker_free (workers[w]);
  g_free (jobs.count);
  cluster_stop (&cluster);
}

static void
test_kill_worker (void)
{
  Cluster cluster;
  Worker *workers[3];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 claimed, held;
  const guint batch = 256;
  guint w;

  g_test_summary ("A worker process killed with SIGKILL in the middle, on a Redis Cluster: its "
                  "shards are taken over, nothing is lost, each key keeps its order, at most a "
                  "batch of jobs runs twice, and the dead worker is forgotten in every group");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  cluster_produce (&cluster, "jobs", 64, scaled (100000), 1000, &jobs);
  for (w = 0; w < 3; w++)
    workers[w] = cluster_worker_start (&cluster, "jobs", w, "--lease-ms=1000", "--batch=256", "--work-us=20",
                                       NULL);
  wait_finished (&cluster.place, "jobs", 64, jobs.total, jobs.total * 3 / 10);
  wait_holding (&cluster.place, "jobs", 64, workers[1]);
  worker_signal (workers[1], SIGKILL);
  /* What the dead worker held when it died, read and not acknowledged:
   * usually some (it held some a moment ago), 0 if it acknowledged them
   * all just before the signal landed. (Waited for: a dead process sends
   * nothing more.) */
  g_subprocess_wait (workers[1]->process, NULL, NULL);
  held = consumer_pending (&cluster.place, "jobs", 64, workers[1]->name);
  wait_finished (&cluster.place, "jobs", 64, jobs.total, jobs.total);
  /* Gone, and holding nothing once taken over: the owners forget it in
   * every group, on every master. */
  wait_forgotten (&cluster.place, "jobs", 64, workers[1]->name);
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
  cluster_stop (&cluster);
}

static void
test_kill_master (void)
{
  Cluster cluster;
  Worker *workers[2];
  Jobs jobs = { 0 };
  Verdict verdict;
  g_autofree char *url = NULL;
  g_autofree char *victim = NULL;
  guint64 refused, claimed;
  const guint batch = 256, n_workers = 2;
  guint seed, killed, w;
  gint shard;

  g_test_summary ("The master serving a shard's stream killed with SIGKILL in the middle: its "
                  "replica takes its place, the workers go on with it, nothing is lost, each key "
                  "keeps its order, and what runs twice is bounded by the workers' batches");
  if (!need_redis_cluster ())
    return;

  cluster_start (&cluster);
  cluster_produce (&cluster, "jobs", 64, scaled (100000), 1000, &jobs);
  /* Every job the producer added is on the replicas too: Redis replicates
   * asynchronously, and a job the killed master had not passed on would be
   * lost with it, by Redis, whatever the queue does. (Adding during a
   * failover is another matter.) */
  cluster_wait_replicated (&cluster);

  /* The master killed serves a shard's stream but is not the seed of the
   * workers' URL: what is checked is a shard's failover, not finding the
   * cluster again without the node named at start. */
  url = cluster_url (&cluster);
  g_assert_cmpint (sscanf (url, "redis+cluster://127.0.0.1:%u", &seed), ==, 1);
  for (shard = 0; shard < 64 && victim == NULL; shard++)
    {
      g_autofree char *stream = stream_name ("jobs", shard);

      if (cluster.nodes[cluster_master_of (&cluster, stream)].port != seed)
        victim = g_steal_pointer (&stream);
    }
  g_assert_nonnull (victim);

  for (w = 0; w < n_workers; w++)
    workers[w] = cluster_worker_start (&cluster, "jobs", w, "--lease-ms=1000", "--batch=256", NULL);
  wait_finished (&cluster.place, "jobs", 64, jobs.total, jobs.total * 3 / 10);
  killed = cluster_kill_master (&cluster, victim);
  g_assert_cmpuint (cluster_master_of (&cluster, victim), !=, killed);
  wait_finished (&cluster.place, "jobs", 64, jobs.total, jobs.total);
  finish_workers (workers, n_workers, -1);
  refused = workers_stat (workers, n_workers, "refused");
  claimed = workers_stat (workers, n_workers, "claimed");

  check_logs (workers, n_workers, &jobs, G_MAXUINT, 0, &verdict);
  g_test_message ("master of %s killed: %" G_GUINT64_FORMAT " runs, %" G_GUINT64_FORMAT " duplicates "
                  "(bound %u), %" G_GUINT64_FORMAT " taken over, %" G_GUINT64_FORMAT " late acks refused",
                  victim, verdict.runs, verdict.duplicates, 2 * batch * n_workers, claimed, refused);
  /* Each worker may run again what it had read and not acknowledged when
   * the failover cut it off: its batch, as after a Redis restart (while
   * the cluster says it is down, every master refuses every command, so
   * leases may run out on all of them). And the acknowledgements the
   * killed master took but had not yet passed on to its replica are
   * pending again on the promoted one: of entries read shortly before,
   * each worker's last batch at most. Hence twice the batch per worker. */
  g_assert_cmpuint (verdict.duplicates, <=, 2 * batch * n_workers);

  for (w = 0; w < n_workers; w++)
    worker_free (workers[w]);
  g_free (jobs.count);
  cluster_stop (&cluster);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  find_redis_server ();
  g_assert_nonnull (g_getenv ("KD_REDIS_WORKER"));

  g_test_add_func ("/kd/redis-cluster/in-process", test_in_process);
  g_test_add_func ("/kd/redis-cluster/add-during-failover", test_add_during_failover);
  g_test_add_func ("/kd/redis-cluster/acl", test_acl);
  g_test_add_func ("/kd/redis-cluster/manual-failover", test_manual_failover);
  g_test_add_func ("/kd/redis-cluster/workers", test_workers);
  g_test_add_func ("/kd/redis-cluster/kill-worker", test_kill_worker);
  g_test_add_func ("/kd/redis-cluster/kill-master", test_kill_master);

  return g_test_run ();
}
