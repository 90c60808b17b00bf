/* test-redis-queue.c: KdRedisQueue against a real redis-server and worker processes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each case starts its own redis-server on 127.0.0.1, on a free port, with
 * appendonly yes in a temporary directory, and stops it afterwards. Only the
 * case that kills the server asks for appendfsync always (so that every
 * acknowledged write survives the SIGKILL): with it, Redis fsyncs in its
 * main thread before it answers, and on a loaded machine a slow disk stalls
 * every client, lease renewals included, for long enough to lose leases.
 * The others use Redis's default, everysec, which fsyncs in the
 * background. The cross-process cases run examples/redis-worker.c (built
 * here as redis-test-worker) as worker processes, which log one line per
 * job run: per-key order, losses and duplicates are checked from those
 * logs, merged on the monotonic clock the processes share.
 *
 * Waiting never polls nor sleeps: a server is up when it says READY=1 on
 * the NOTIFY_SOCKET it is given (--supervised systemd); a worker has joined
 * the queue when it prints its name on its standard output; progress is
 * kd_redis_queue_wait_backlog(), woken by the consumers' publications; a
 * trim is a keyspace event; a worker's end is waitpid(). Each wait has a
 * deadline, past which the test fails.
 *
 * Skipped, with the reason, only when redis-server is not installed.
 */

#include "config.h"

#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd-redis-consumer-private.h"
/* Its locks, which ThreadSanitizer sees (GLib's futexes it does not). */
#include "kd-sync-private.h"
#include "kd-test-util.h"

#define DEADLINE_US (120 * G_TIME_SPAN_SECOND)

/* ---- A redis-server of our own ----------------------------------------- */

typedef struct
{
  char        *dir;
  guint        port;
  gboolean     fsync_always;
  GSubprocess *process;
} Server;

static char *redis_server_path;

static gboolean
need_redis (void)
{
  if (redis_server_path == NULL)
    {
      g_test_skip ("redis-server is not installed (Debian: apt-get install redis-server)");
      return FALSE;
    }
  return TRUE;
}

/* Children die with the test, even when an assertion aborts it. */
static void
die_with_parent (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGKILL);
}

static guint
free_port (void)
{
  g_autoptr (GSocket) socket = NULL;
  g_autoptr (GInetAddress) loopback = g_inet_address_new_loopback (G_SOCKET_FAMILY_IPV4);
  g_autoptr (GSocketAddress) address = g_inet_socket_address_new (loopback, 0);
  g_autoptr (GSocketAddress) bound = NULL;
  g_autoptr (GError) error = NULL;

  socket = g_socket_new (G_SOCKET_FAMILY_IPV4, G_SOCKET_TYPE_STREAM, G_SOCKET_PROTOCOL_TCP, &error);
  g_assert_no_error (error);
  g_socket_bind (socket, address, TRUE, &error);
  g_assert_no_error (error);
  bound = g_socket_get_local_address (socket, &error);
  g_assert_no_error (error);
  return g_inet_socket_address_get_port (G_INET_SOCKET_ADDRESS (bound));
}

static redisContext *
server_connect (Server *server)
{
  struct timeval tv = { 5, 0 };
  redisContext *c = redisConnectWithTimeout ("127.0.0.1", (int) server->port, tv);

  if (c != NULL && c->err != 0)
    g_clear_pointer (&c, redisFree);
  return c;
}

/* Starts (or restarts, on the same directory and port, from its AOF) the
 * server, and waits until it says it is ready (loaded, and accepting
 * connections), as it tells systemd: READY=1 on the datagram socket named
 * by NOTIFY_SOCKET. */
static void
server_launch (Server *server)
{
  g_autoptr (GSubprocessLauncher) launcher = g_subprocess_launcher_new (G_SUBPROCESS_FLAGS_NONE);
  g_autoptr (GError) error = NULL;
  g_autofree char *port = g_strdup_printf ("%u", server->port);
  g_autofree char *log = g_build_filename (server->dir, "redis.log", NULL);
  g_autofree char *notify_path = g_build_filename (server->dir, "notify.sock", NULL);
  struct sockaddr_un address = { .sun_family = AF_UNIX };
  gint64 deadline = g_get_monotonic_time () + DEADLINE_US;
  int notify = socket (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);

  g_assert_cmpint (notify, >=, 0);
  g_assert_cmpuint (strlen (notify_path), <, sizeof address.sun_path);
  strcpy (address.sun_path, notify_path);
  unlink (notify_path);
  g_assert_cmpint (bind (notify, (struct sockaddr *) &address, sizeof address), ==, 0);

  g_subprocess_launcher_set_child_setup (launcher, die_with_parent, NULL, NULL);
  g_subprocess_launcher_setenv (launcher, "NOTIFY_SOCKET", notify_path, TRUE);
  server->process = g_subprocess_launcher_spawn (launcher, &error, redis_server_path,
                                                 "--port", port, "--bind", "127.0.0.1",
                                                 "--dir", server->dir, "--appendonly", "yes",
                                                 "--appendfsync", server->fsync_always ? "always" : "everysec",
                                                 "--notify-keyspace-events", "Et", "--save", "",
                                                 "--supervised", "systemd", "--logfile", log, NULL);
  g_assert_no_error (error);

  for (;;)
    {
      struct pollfd ready = { notify, POLLIN, 0 };
      gint64 left = deadline - g_get_monotonic_time ();
      char message[512];
      ssize_t len;

      g_assert_cmpint (left, >, 0);
      if (poll (&ready, 1, (int) (left / 1000)) == 0)
        g_error ("redis-server did not say READY=1 in %d s (see %s)", (int) (DEADLINE_US / G_USEC_PER_SEC), log);
      len = recv (notify, message, sizeof message - 1, 0);
      g_assert_cmpint (len, >=, 0);
      message[len] = '\0';
      if (strstr (message, "READY=1") != NULL)
        break;
    }
  close (notify);
  unlink (notify_path);
}

static void
server_start (Server *server)
{
  g_autoptr (GError) error = NULL;

  server->dir = g_dir_make_tmp ("kd-redis-XXXXXX", &error);
  g_assert_no_error (error);
  server->port = free_port ();
  server_launch (server);
}

/* Stops redis-server now. g_subprocess_send_signal() only hands the signal
 * to GLib's worker thread, which sends it later, so what the test does next
 * could still reach a running server: send it here, and wait until the
 * server is stopped (without reaping anything: WNOWAIT). */
static void
server_freeze (Server *server)
{
  pid_t pid = (pid_t) g_ascii_strtoll (g_subprocess_get_identifier (server->process), NULL, 10);
  siginfo_t info = { 0 };

  g_assert_cmpint (kill (pid, SIGSTOP), ==, 0);
  g_assert_cmpint (waitid (P_PID, pid, &info, WSTOPPED | WNOWAIT), ==, 0);
  g_assert_cmpint (info.si_code, ==, CLD_STOPPED);
}

static void
server_kill (Server *server)
{
  g_subprocess_send_signal (server->process, SIGKILL);
  g_subprocess_wait (server->process, NULL, NULL);
  g_clear_object (&server->process);
}

static void
server_stop (Server *server)
{
  g_autoptr (GFile) dir = g_file_new_for_path (server->dir);
  g_autoptr (GFileEnumerator) children = NULL;
  GFileInfo *info;

  server_kill (server);
  children = g_file_enumerate_children (dir, G_FILE_ATTRIBUTE_STANDARD_NAME, G_FILE_QUERY_INFO_NONE, NULL, NULL);
  while (children != NULL && (info = g_file_enumerator_next_file (children, NULL, NULL)) != NULL)
    {
      g_autoptr (GFile) child = g_file_get_child (dir, g_file_info_get_name (info));
      g_autoptr (GFileEnumerator) grand = g_file_enumerate_children (child, G_FILE_ATTRIBUTE_STANDARD_NAME,
                                                                     G_FILE_QUERY_INFO_NONE, NULL, NULL);
      GFileInfo *sub;

      /* Redis 7 keeps its AOF in a directory of its own. */
      while (grand != NULL && (sub = g_file_enumerator_next_file (grand, NULL, NULL)) != NULL)
        {
          g_autoptr (GFile) file = g_file_get_child (child, g_file_info_get_name (sub));

          g_file_delete (file, NULL, NULL);
          g_object_unref (sub);
        }
      g_file_delete (child, NULL, NULL);
      g_object_unref (info);
    }
  g_file_delete (dir, NULL, NULL);
  g_free (server->dir);
}

static KdRedisQueue *
open_queue (Server     *server,
            const char *name,
            guint       n_shards)
{
  KdRedisQueue *queue = kd_redis_queue_new (name);

  kd_redis_queue_set_address (queue, "127.0.0.1", server->port);
  kd_redis_queue_set_n_shards (queue, n_shards);
  return queue;
}

/* ---- What the queue holds ---------------------------------------------- */

/* The stream of shard @shard of queue @name; -1: the unkeyed one. */
static char *
stream_name (const char *name,
             gint        shard)
{
  return shard < 0 ? g_strdup_printf ("%s:{u}", name) : g_strdup_printf ("%s:{%d}", name, shard);
}

/* Sends @format (a command, with %s for the stream) for each stream of the
 * queue, the unkeyed one first, in one round trip, and hands each reply to
 * @each. */
static void
each_stream (Server      *server,
             const char  *name,
             guint        n_shards,
             const char  *format,
             void       (*each) (const redisReply *reply,
                                 gpointer          data),
             gpointer     data)
{
  redisContext *c = server_connect (server);
  gint shard;

  g_assert_nonnull (c);
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);

      redisAppendCommand (c, format, stream);
    }
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      redisReply *reply = NULL;

      g_assert_cmpint (redisGetReply (c, (void **) &reply), ==, REDIS_OK);
      g_assert_cmpint (reply->type, !=, REDIS_REPLY_ERROR);
      each (reply, data);
      freeReplyObject (reply);
    }
  redisFree (c);
}

typedef struct
{
  const char *consumer;
  guint64     count;
} Counting;

typedef struct
{
  guint64 entries;     /* in all the streams */
  guint64 unfinished;  /* pending (read, not acknowledged) or not read yet */
} Progress;

static void
queue_progress (Server     *server,
                const char *name,
                guint       n_shards,
                Progress   *progress)
{
  redisContext *c = server_connect (server);
  g_autoptr (GPtrArray) unknown = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) unknown_streams = g_ptr_array_new_with_free_func (g_free);
  gint shard;
  guint i;

  g_assert_nonnull (c);
  progress->entries = progress->unfinished = 0;
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);

      redisAppendCommand (c, "XLEN %s", stream);
      redisAppendCommand (c, "XINFO GROUPS %s", stream);
    }
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      redisReply *reply = NULL;
      gsize g, f;

      g_assert_cmpint (redisGetReply (c, (void **) &reply), ==, REDIS_OK);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_INTEGER);
      progress->entries += (guint64) reply->integer;
      freeReplyObject (reply);

      g_assert_cmpint (redisGetReply (c, (void **) &reply), ==, REDIS_OK);
      /* No group yet (no consumer ran): nothing was read. */
      if (reply->type == REDIS_REPLY_ERROR)
        {
          freeReplyObject (reply);
          continue;
        }
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
      for (g = 0; g < reply->elements; g++)
        {
          redisReply *group = reply->element[g];
          gboolean lag_known = FALSE;
          const char *last = "0-0";

          for (f = 0; f + 1 < group->elements; f += 2)
            {
              const char *field = group->element[f]->str;
              redisReply *value = group->element[f + 1];

              if (strcmp (field, "pending") == 0)
                progress->unfinished += (guint64) value->integer;
              else if (strcmp (field, "lag") == 0 && value->type == REDIS_REPLY_INTEGER)
                {
                  progress->unfinished += (guint64) value->integer;
                  lag_known = TRUE;
                }
              else if (strcmp (field, "last-delivered-id") == 0)
                last = value->str;
            }
          /* After a restart from the AOF Redis no longer knows the lag:
           * count the entries not delivered yet. */
          if (!lag_known)
            g_ptr_array_add (unknown, g_strdup_printf ("(%s", last));
          if (!lag_known)
            g_ptr_array_add (unknown_streams, stream_name (name, shard));
        }
      freeReplyObject (reply);
    }
  for (i = 0; i < unknown->len; i++)
    {
      redisReply *reply = redisCommand (c, "XRANGE %s %s +", (char *) g_ptr_array_index (unknown_streams, i),
                                        (char *) g_ptr_array_index (unknown, i));

      g_assert_nonnull (reply);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
      progress->unfinished += reply->elements;
      freeReplyObject (reply);
    }
  redisFree (c);
}

/* Waits until at least @done of @total jobs are finished (acknowledged or
 * dead-lettered); all of them if @done is @total. */
static void
wait_finished (Server     *server,
               const char *name,
               guint       n_shards,
               guint64     total,
               guint64     done)
{
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, n_shards);
  g_autoptr (GError) error = NULL;
  Progress progress;

  if (!kd_redis_queue_wait_backlog (queue, total - done, DEADLINE_US, &error))
    {
      queue_progress (server, name, n_shards, &progress);
      g_error ("%" G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT " jobs finished: %s",
               total - progress.unfinished, total, error->message);
    }
  /* The library's count against the test's own. */
  queue_progress (server, name, n_shards, &progress);
  g_assert_cmpuint (progress.entries, <=, total);
  g_assert_cmpuint (progress.unfinished, <=, total - done);
}

static void
add_pending (const redisReply *reply,
             gpointer          data)
{
  Counting *counting = data;
  gsize i;

  /* [count, first id, last id, [[consumer, count], ...]] */
  if (reply->elements == 4 && reply->element[3]->type == REDIS_REPLY_ARRAY)
    for (i = 0; i < reply->element[3]->elements; i++)
      if (strcmp (reply->element[3]->element[i]->element[0]->str, counting->consumer) == 0)
        counting->count += g_ascii_strtoull (reply->element[3]->element[i]->element[1]->str, NULL, 10);
}

/* How many entries @consumer holds read and not acknowledged. */
static guint64
consumer_pending (Server     *server,
                  const char *name,
                  guint       n_shards,
                  const char *consumer)
{
  Counting counting = { consumer, 0 };

  each_stream (server, name, n_shards, "XPENDING %s kd", add_pending, &counting);
  return counting.count;
}

static void
add_length (const redisReply *reply,
            gpointer          data)
{
  Counting *counting = data;

  g_assert_cmpint (reply->type, ==, REDIS_REPLY_INTEGER);
  counting->count += (guint64) reply->integer;
}

/* How many entries the queue's streams hold, the unkeyed one included. */
static guint64
streams_length (Server     *server,
                const char *name,
                guint       n_shards)
{
  Counting counting = { NULL, 0 };

  each_stream (server, name, n_shards, "XLEN %s", add_length, &counting);
  return counting.count;
}

static gboolean
id_after (const char *id,
          const char *than)
{
  guint64 ms, seq, than_ms, than_seq;

  g_assert_cmpint (sscanf (id, "%" G_GUINT64_FORMAT "-%" G_GUINT64_FORMAT, &ms, &seq), ==, 2);
  g_assert_cmpint (sscanf (than, "%" G_GUINT64_FORMAT "-%" G_GUINT64_FORMAT, &than_ms, &than_seq), ==, 2);
  return ms > than_ms || (ms == than_ms && seq > than_seq);
}

/* How many of the entries the streams still hold are unfinished: pending
 * in the group, or after the last one it was delivered. */
static guint64
unfinished_present (Server     *server,
                    const char *name,
                    guint       n_shards)
{
  redisContext *c = server_connect (server);
  guint64 present = 0;
  gint shard;

  g_assert_nonnull (c);
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);
      g_autoptr (GHashTable) pending = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
      g_autofree char *last = NULL;
      redisReply *reply;
      gsize i, f;

      reply = redisCommand (c, "XINFO GROUPS %s", stream);
      g_assert_nonnull (reply);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
      g_assert_cmpuint (reply->elements, ==, 1);
      for (f = 0; f + 1 < reply->element[0]->elements; f += 2)
        if (strcmp (reply->element[0]->element[f]->str, "last-delivered-id") == 0)
          last = g_strdup (reply->element[0]->element[f + 1]->str);
      freeReplyObject (reply);
      g_assert_nonnull (last);

      reply = redisCommand (c, "XPENDING %s kd - + 1000000", stream);
      g_assert_nonnull (reply);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
      for (i = 0; i < reply->elements; i++)
        g_hash_table_add (pending, g_strdup (reply->element[i]->element[0]->str));
      freeReplyObject (reply);

      reply = redisCommand (c, "XRANGE %s - +", stream);
      g_assert_nonnull (reply);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
      for (i = 0; i < reply->elements; i++)
        {
          const char *id = reply->element[i]->element[0]->str;

          if (g_hash_table_contains (pending, id) || id_after (id, last))
            present++;
        }
      freeReplyObject (reply);
    }
  redisFree (c);
  return present;
}

/* Waits until @done (@data) holds, looking again after each keyspace event
 * @event (which the test's servers notify). */
static void
wait_keyevent (Server      *server,
               const char  *event,
               gboolean   (*done) (gpointer data),
               gpointer     data,
               const char  *what)
{
  gint64 deadline = g_get_monotonic_time () + DEADLINE_US;
  redisContext *c = server_connect (server);
  redisReply *reply = redisCommand (c, "SUBSCRIBE __keyevent@0__:%s", event);

  g_assert_nonnull (reply);
  freeReplyObject (reply);
  /* Subscribed before looking: an event after the look wakes the wait. */
  while (!done (data))
    {
      gint64 left = deadline - g_get_monotonic_time ();
      struct timeval tv = { (time_t) (MAX (left, 1) / G_USEC_PER_SEC), (suseconds_t) (MAX (left, 1) % G_USEC_PER_SEC) };

      g_assert_cmpint (left, >, 0);
      g_assert_cmpint (redisSetTimeout (c, tv), ==, REDIS_OK);
      if (redisGetReply (c, (void **) &reply) != REDIS_OK)
        g_error ("%s: not in %d s: %s", what, (int) (DEADLINE_US / G_USEC_PER_SEC), c->errstr);
      freeReplyObject (reply);
    }
  redisFree (c);
}

typedef struct
{
  Server     *server;
  const char *name;
  guint       n_shards;
  guint64     length;
  const char *consumer;
} Looking;

static gboolean
trimmed_down (gpointer data)
{
  Looking *looking = data;

  return streams_length (looking->server, looking->name, looking->n_shards) <= looking->length;
}

/* Waits until the consumers have trimmed the queue's streams down to
 * @length entries. */
static void
wait_trimmed (Server     *server,
              const char *name,
              guint       n_shards,
              guint64     length)
{
  Looking looking = { server, name, n_shards, length, NULL };

  wait_keyevent (server, "xtrim", trimmed_down, &looking, "trimming the streams");
}

static void
add_if_known (const redisReply *reply,
              gpointer          data)
{
  Counting *counting = data;
  gsize i, f;

  for (i = 0; i < reply->elements; i++)
    for (f = 0; f + 1 < reply->element[i]->elements; f += 2)
      if (strcmp (reply->element[i]->element[f]->str, "name") == 0 &&
          strcmp (reply->element[i]->element[f + 1]->str, counting->consumer) == 0)
        counting->count++;
}

/* How many of the queue's groups (one per stream) know @consumer. */
static guint64
consumer_groups (Server     *server,
                 const char *name,
                 guint       n_shards,
                 const char *consumer)
{
  Counting counting = { consumer, 0 };

  each_stream (server, name, n_shards, "XINFO CONSUMERS %s kd", add_if_known, &counting);
  return counting.count;
}

static gboolean
forgotten (gpointer data)
{
  Looking *looking = data;

  return consumer_groups (looking->server, looking->name, looking->n_shards, looking->consumer) == 0;
}

/* Waits until no group of the queue knows @consumer any more. */
static void
wait_forgotten (Server     *server,
                const char *name,
                guint       n_shards,
                const char *consumer)
{
  Looking looking = { server, name, n_shards, 0, consumer };

  wait_keyevent (server, "xgroup-delconsumer", forgotten, &looking, "forgetting a dead consumer");
}

/* ---- Jobs: key-K numbered from 1, in a shuffled order of keys ---------- */

typedef struct
{
  guint  n_keys;
  guint *count;        /* per key: how many jobs */
  guint  total;
} Jobs;


static void
produce (Server     *server,
         const char *name,
         guint       n_shards,
         guint       n_jobs,
         guint       n_keys,
         Jobs       *jobs)
{
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, n_shards);
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GError) error = NULL;
  GRand *rand = g_rand_new_with_seed (n_jobs + n_keys);
  guint i;

  jobs->n_keys = n_keys;
  jobs->count = g_new0 (guint, n_keys);
  jobs->total = n_jobs;
  for (i = 0; i < n_jobs; i++)
    {
      guint k = (guint) g_rand_int_range (rand, 0, (gint32) n_keys);
      char *text = g_strdup_printf ("%u", ++jobs->count[k]);

      g_ptr_array_add (keys, g_strdup_printf ("key-%u", k));
      g_ptr_array_add (payloads, g_bytes_new_take (text, strlen (text)));
    }
  g_rand_free (rand);

  g_assert_true (kd_redis_queue_add_many (queue, keys->len, (const char **) keys->pdata,
                                          (GBytes **) payloads->pdata, &error));
  g_assert_no_error (error);
}

/* ---- Worker processes -------------------------------------------------- */

typedef struct
{
  GSubprocess      *process;
  GDataInputStream *stdout_lines;
  char             *log;
  char             *name;    /* its consumer name */
  char             *out;     /* its output, once it finished */
} Worker;

static Worker *
worker_start (Server     *server,
              const char *name,
              guint       index,
              ...)
{
  g_autoptr (GSubprocessLauncher) launcher = g_subprocess_launcher_new (G_SUBPROCESS_FLAGS_NONE);
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GError) error = NULL;
  Worker *worker = g_new0 (Worker, 1);
  g_autofree char *first = NULL;
  char consumer[128];
  const char *arg;
  va_list ap;

  worker->log = g_strdup_printf ("%s/worker-%u.log", server->dir, index);
  g_ptr_array_add (argv, g_strdup (g_getenv ("KD_REDIS_WORKER")));
  g_ptr_array_add (argv, g_strdup_printf ("--port=%u", server->port));
  g_ptr_array_add (argv, g_strdup_printf ("--name=%s", name));
  g_ptr_array_add (argv, g_strdup_printf ("--log=%s", worker->log));
  va_start (ap, index);
  while ((arg = va_arg (ap, const char *)) != NULL)
    g_ptr_array_add (argv, g_strdup (arg));
  va_end (ap);
  g_ptr_array_add (argv, NULL);

  g_subprocess_launcher_set_child_setup (launcher, die_with_parent, NULL, NULL);
  g_subprocess_launcher_set_flags (launcher, G_SUBPROCESS_FLAGS_STDOUT_PIPE);
  worker->process = g_subprocess_launcher_spawnv (launcher, (const char *const *) argv->pdata, &error);
  g_assert_no_error (error);

  /* It has joined the queue once it says its name (or it failed, and its
   * output ends). */
  worker->stdout_lines = g_data_input_stream_new (g_subprocess_get_stdout_pipe (worker->process));
  first = g_data_input_stream_read_line_utf8 (worker->stdout_lines, NULL, NULL, &error);
  g_assert_no_error (error);
  g_assert_nonnull (first);
  g_assert_cmpint (sscanf (first, "redis-worker: %127s consuming", consumer), ==, 1);
  worker->name = g_strdup (consumer);
  return worker;
}

static void
worker_signal (Worker *worker,
               int     signum)
{
  g_subprocess_send_signal (worker->process, signum);
}

/* Stops a worker gracefully (or finds it killed), and keeps the rest of its
 * output. */
static void
worker_finish (Worker   *worker,
               gboolean  killed)
{
  g_autoptr (GString) out = g_string_new (NULL);
  g_autoptr (GError) error = NULL;
  char *line;

  if (!killed)
    worker_signal (worker, SIGTERM);
  while ((line = g_data_input_stream_read_line_utf8 (worker->stdout_lines, NULL, NULL, &error)) != NULL)
    {
      g_string_append_printf (out, "%s\n", line);
      g_free (line);
    }
  g_assert_no_error (error);
  g_subprocess_wait (worker->process, NULL, &error);
  g_assert_no_error (error);
  if (!killed)
    {
      g_assert_true (g_subprocess_get_if_exited (worker->process));
      g_assert_cmpint (g_subprocess_get_exit_status (worker->process), ==, 0);
    }
  worker->out = g_string_free (g_steal_pointer (&out), FALSE);
}

static void
worker_free (Worker *worker)
{
  g_clear_object (&worker->stdout_lines);
  g_clear_object (&worker->process);
  g_free (worker->log);
  g_free (worker->name);
  g_free (worker->out);
  g_free (worker);
}

static guint64
stat_of (const char *out,
         const char *name)
{
  g_autofree char *needle = g_strdup_printf (" %s ", name);
  const char *at = out != NULL ? strstr (out, needle) : NULL;

  return at != NULL ? g_ascii_strtoull (at + strlen (needle), NULL, 10) : 0;
}

/* ---- The logs ---------------------------------------------------------- */

typedef struct
{
  gint64   time;       /* its start */
  gint64   end;
  guint    file;
  guint    line;
  guint    key;
  guint    seq;
  guint    attempt;
  gboolean ok;
  gboolean rerun;      /* the job ran again later, in another worker */
} Run;

static gint
run_compare (gconstpointer a,
             gconstpointer b)
{
  const Run *x = a, *y = b;

  if (x->key != y->key)
    return x->key < y->key ? -1 : 1;
  if (x->time != y->time)
    return x->time < y->time ? -1 : 1;
  if (x->file != y->file)
    return x->file < y->file ? -1 : 1;
  return x->line < y->line ? -1 : (x->line > y->line ? 1 : 0);
}

typedef struct
{
  guint64 runs;
  guint64 duplicates;  /* runs of a job that had completed already */
} Verdict;

/* Checks, from the workers' logs, that every job ran, and that each key's
 * runs, in the order they started, never skip ahead: every run is of the
 * job after the one that ran last, or a rerun of an earlier one (after a
 * takeover, the unacknowledged tail of a key runs again, in order). And
 * that a key's runs never overlap: each starts once the one before has
 * ended, except after a run that was taken over (the same job ran again
 * later, in another worker): a job that started in time may still run
 * when its rerun and the key's next jobs start elsewhere (see "Fencing" in
 * kd-redis-queue.c). The jobs of @fail_key (if below the number of keys)
 * always fail: each must have run @fail_attempts times instead. */
static void
check_logs (Worker  **workers,
            guint     n_workers,
            Jobs     *jobs,
            guint     fail_key,
            guint     fail_attempts,
            Verdict  *verdict)
{
  g_autoptr (GArray) runs = g_array_new (FALSE, FALSE, sizeof (Run));
  g_autofree guint8 *done = NULL;
  g_autofree guint *first = g_new0 (guint, jobs->n_keys + 1);
  gint64 busy_until = 0;
  guint w, i, k;

  memset (verdict, 0, sizeof *verdict);
  for (w = 0; w < n_workers; w++)
    {
      g_autofree char *text = NULL;
      g_auto (GStrv) lines = NULL;

      if (!g_file_get_contents (workers[w]->log, &text, NULL, NULL))
        continue;
      lines = g_strsplit (text, "\n", -1);
      for (i = 0; lines[i] != NULL; i++)
        {
          Run run = { 0, 0, w, i, 0, 0, 0, FALSE, FALSE };
          char key[64], status[8];

          if (lines[i][0] == '\0')
            continue;
          g_assert_cmpint (sscanf (lines[i], "%" G_GINT64_FORMAT " %" G_GINT64_FORMAT " %63s %u %u %7s",
                                   &run.time, &run.end, key, &run.seq, &run.attempt, status), ==, 6);
          g_assert_cmpint (run.end, >=, run.time);
          g_assert_true (g_str_has_prefix (key, "key-"));
          run.key = (guint) atoi (key + 4);
          run.ok = strcmp (status, "ok") == 0;
          g_assert_cmpuint (run.key, <, jobs->n_keys);
          g_assert_cmpuint (run.seq, >=, 1);
          g_assert_cmpuint (run.seq, <=, jobs->count[run.key]);
          g_array_append_val (runs, run);
        }
    }
  g_array_sort (runs, run_compare);
  verdict->runs = runs->len;

  /* The runs taken over: a later run of the same job in another worker. */
  for (i = 0; i < runs->len; i++)
    {
      Run *run = &g_array_index (runs, Run, i);

      for (k = i + 1; k < runs->len && g_array_index (runs, Run, k).key == run->key && !run->rerun; k++)
        if (g_array_index (runs, Run, k).seq == run->seq && g_array_index (runs, Run, k).file != run->file)
          run->rerun = TRUE;
    }

  /* Per key, a bitmap of completed jobs, at first[key]. */
  for (k = 0; k < jobs->n_keys; k++)
    first[k + 1] = first[k] + jobs->count[k] + 1;
  done = g_new0 (guint8, first[jobs->n_keys]);

  for (i = 0; i < runs->len; i++)
    {
      const Run *run = &g_array_index (runs, Run, i);
      const Run *before = i > 0 ? &g_array_index (runs, Run, i - 1) : NULL;
      guint last = before != NULL && before->key == run->key ? before->seq : 0;

      if (before == NULL || before->key != run->key)
        busy_until = 0;
      if (run->seq > last + 1)
        g_error ("key-%u: job %u ran after job %u (worker %u, line %u)", run->key, run->seq, last,
                 run->file, run->line + 1);
      if (run->time < busy_until)
        g_error ("key-%u: job %u started (worker %u, line %u) before the key's run before it ended",
                 run->key, run->seq, run->file, run->line + 1);
      if (!run->rerun)
        busy_until = MAX (busy_until, run->end);
      if (run->key == fail_key)
        {
          g_assert_false (run->ok);
          done[first[run->key] + run->seq]++;
          g_assert_cmpuint (run->attempt, ==, done[first[run->key] + run->seq]);
        }
      else if (run->ok)
        {
          if (done[first[run->key] + run->seq])
            verdict->duplicates++;
          done[first[run->key] + run->seq] = 1;
        }
    }
  for (k = 0; k < jobs->n_keys; k++)
    for (i = 1; i <= jobs->count[k]; i++)
      if (done[first[k] + i] != (k == fail_key ? fail_attempts : 1))
        g_error ("key-%u: job %u of %u ran %u times to its end, not %u: lost", k, i, jobs->count[k],
                 done[first[k] + i], k == fail_key ? fail_attempts : 1);
}

/* ---- In one process ---------------------------------------------------- */

typedef struct
{
  GMutex      lock;
  GHashTable *last;    /* key → last number run */
  guint       keyed;
  guint       unkeyed;
  gboolean    out_of_order;
} Seen;

static gboolean
record_job (KdJob    *job,
            gpointer  user_data,
            GError  **error)
{
  Seen *seen = user_data;
  KdRedisEntry *entry = kd_job_get_item (job);
  const char *key = kd_job_get_key (job);
  gsize len;
  guint seq = (guint) atoi ((const char *) kd_redis_entry_get_payload (entry, &len));

  g_assert_cmpstr (key, ==, kd_redis_entry_get_key (entry));
  g_assert_cmpstr (kd_redis_entry_get_producer (entry), !=, "");
  g_assert_cmpuint (kd_redis_entry_get_sequence (entry), >, 0);
  kd_mutex_lock (&seen->lock);
  if (key != NULL)
    {
      guint last = GPOINTER_TO_UINT (g_hash_table_lookup (seen->last, key));

      g_assert_cmpint (kd_redis_entry_get_shard (entry), >=, 0);
      if (seq != last + 1)
        seen->out_of_order = TRUE;
      g_hash_table_insert (seen->last, g_strdup (key), GUINT_TO_POINTER (seq));
      seen->keyed++;
    }
  else
    {
      g_assert_cmpint (kd_redis_entry_get_shard (entry), ==, -1);
      seen->unkeyed++;
    }
  kd_mutex_unlock (&seen->lock);
  return TRUE;
}

static void
test_in_process (void)
{
  Server server = { 0 };
  Seen seen = { 0 };
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
  g_mutex_init (&seen.lock);
  seen.last = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);

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

  dispatcher = kd_redis_queue_new_dispatcher (queue, 4, record_job, &seen, NULL);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);

  /* Woken by the consumer's acknowledgements until none is left. */
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, DEADLINE_US, &error));
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
  queue_progress (&server, "inproc", 8, &progress);
  g_assert_cmpuint (progress.entries, <=, jobs.total + 100);
  g_assert_cmpuint (progress.unfinished, ==, 0);

  g_clear_object (&dispatcher);
  g_clear_object (&queue);
  g_hash_table_unref (seen.last);
  g_mutex_clear (&seen.lock);
  g_free (jobs.count);
  server_stop (&server);
}

/* ---- The consumer's state, without Redis -------------------------------- */

static void
test_deadline_fence (void)
{
  KdRedisConfig config = { (char *) "127.0.0.1", 6379, (char *) "fence", 4, G_USEC_PER_SEC, 16, 3, 0, 0 };
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
  gint64 deadline = g_get_monotonic_time () + DEADLINE_US;
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
  gint64 deadline = g_get_monotonic_time () + DEADLINE_US;
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
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, DEADLINE_US, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_trim (queue, &trimmed, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (streams_length (&server, "trim", 4), ==, 0);

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
  queue_progress (&server, "trim", 4, &progress);
  g_test_message ("%" G_GUINT64_FORMAT " unfinished, %" G_GUINT64_FORMAT " trimmed", progress.unfinished, trimmed);
  g_assert_cmpuint (progress.unfinished, >, keys->len / 2);
  g_assert_cmpuint (unfinished_present (&server, "trim", 4), ==, progress.unfinished);

  /* Once they are acknowledged, they go too. */
  kd_mutex_lock (&gate.lock);
  gate.open = TRUE;
  g_cond_broadcast (&gate.cond);
  kd_mutex_unlock (&gate.lock);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, DEADLINE_US, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_trim (queue, NULL, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (streams_length (&server, "trim", 4), ==, 0);

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
  gint64 deadline = g_get_monotonic_time () + DEADLINE_US;
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
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, DEADLINE_US, &error));
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
  dispatcher = kd_redis_queue_new_dispatcher (other, 1, record_job, NULL, NULL);
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

/* ---- Producers that send a job twice ----------------------------------- */

static guint
scaled (guint n)
{
  const char *scale = g_getenv ("KD_TEST_SCALE");
  double factor = scale != NULL ? g_ascii_strtod (scale, NULL) : 1.0;

  return MAX ((guint) (n * (factor > 0 ? factor : 1.0)), 1000);
}

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
  Seen seen = { 0 };
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, n_shards);
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;

  g_mutex_init (&seen.lock);
  seen.last = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  dispatcher = kd_redis_queue_new_dispatcher (queue, 4, record_job, &seen, NULL);
  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_stop (queue);
  kd_redis_queue_get_stats (queue, stats);

  g_assert_false (seen.out_of_order);
  g_assert_cmpuint (seen.keyed, ==, jobs->total);
  g_assert_cmpuint (stats->acked, ==, jobs->total);
  g_hash_table_unref (seen.last);
  g_mutex_clear (&seen.lock);
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

  g_test_summary ("A producer whose connection is killed while it adds sends again the jobs whose "
                  "replies it lost, under the same ids: each job runs once; writing into a "
                  "connection Redis closed raises no SIGPIPE that would kill the process");
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
                        (int) (DEADLINE_US / 1000));
  g_assert_nonnull (first);
  g_assert_cmpint (first->type, ==, REDIS_REPLY_ARRAY);
  freeReplyObject (first);
  redisFree (c);
  g_assert_true (kill_client (&server, "kd:retry:producer:"));
  g_thread_join (thread);
  g_assert_no_error (adding.error);
  g_assert_true (adding.ok);

  copies = streams_length (&server, "retry", 4) - jobs.total;
  g_test_message ("%" G_GUINT64_FORMAT " jobs stored twice", copies);

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
finish_workers (Worker  **workers,
                guint     n,
                gint      killed,
                guint64  *refused,
                guint64  *skipped)
{
  guint w;

  *refused = *skipped = 0;
  for (w = 0; w < n; w++)
    {
      worker_finish (workers[w], (gint) w == killed);
      g_test_message ("worker %u (%s): %s", w, workers[w]->name, workers[w]->out);
      *refused += stat_of (workers[w]->out, "refused");
      *skipped += stat_of (workers[w]->out, "skipped");
    }
}

/* Waits until @worker holds entries read and not acknowledged, looking
 * again after each step of the queue's progress. (A broken build that
 * acknowledges on read never holds any: the test fails at the deadline.) */
static void
wait_holding (Server     *server,
              const char *name,
              guint       n_shards,
              Worker     *worker)
{
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, n_shards);
  g_autoptr (GError) error = NULL;
  guint64 backlog;

  while (consumer_pending (server, name, n_shards, worker->name) == 0)
    {
      g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
      g_assert_no_error (error);
      g_assert_cmpuint (backlog, >, 0);
      g_assert_true (kd_redis_queue_wait_backlog (queue, backlog - 1, DEADLINE_US, &error));
      g_assert_no_error (error);
    }
}

static void
test_workers (void)
{
  Server server = { 0 };
  Worker *workers[3];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 refused, skipped, claimed = 0, trimmed = 0;
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
      wait_finished (&server, "jobs", 64, jobs.total, jobs.total * (w + 1) / 10);
    }
  wait_finished (&server, "jobs", 64, jobs.total, jobs.total);
  /* Every job acknowledged: the shards' owners trim their streams empty. */
  wait_trimmed (&server, "jobs", 64, 0);
  finish_workers (workers, 3, -1, &refused, &skipped);

  for (w = 0; w < 3; w++)
    {
      claimed += stat_of (workers[w]->out, "claimed");
      trimmed += stat_of (workers[w]->out, "trimmed");
    }
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

static void
test_kill (void)
{
  Server server = { 0 };
  Worker *workers[3];
  Jobs jobs = { 0 };
  Verdict verdict;
  guint64 refused, skipped, claimed = 0, held;
  const guint batch = 256;
  guint w;

  g_test_summary ("A worker killed with SIGKILL in the middle: its shards are taken over, nothing "
                  "is lost, each key keeps its order, at most a batch of jobs runs twice, and the "
                  "dead worker is forgotten in every group");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "jobs", 64, scaled (100000), 1000, &jobs);
  for (w = 0; w < 3; w++)
    workers[w] = worker_start (&server, "jobs", w, "--lease-ms=1000", "--batch=256", "--work-us=20", NULL);
  wait_finished (&server, "jobs", 64, jobs.total, jobs.total * 3 / 10);
  wait_holding (&server, "jobs", 64, workers[1]);
  worker_signal (workers[1], SIGKILL);
  /* What the dead worker held when it died, read and not acknowledged:
   * usually some (it held some a moment ago), 0 if it acknowledged them
   * all just before the signal landed. (Waited for: a dead process sends
   * nothing more.) */
  g_subprocess_wait (workers[1]->process, NULL, NULL);
  held = consumer_pending (&server, "jobs", 64, workers[1]->name);
  wait_finished (&server, "jobs", 64, jobs.total, jobs.total);
  /* Gone, and holding nothing once taken over: the owners forget it in
   * every group. */
  wait_forgotten (&server, "jobs", 64, workers[1]->name);
  finish_workers (workers, 3, 1, &refused, &skipped);
  for (w = 0; w < 3; w++)
    claimed += stat_of (workers[w]->out, "claimed");

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
  guint64 refused, skipped, held, claimed, duplicates;
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
  wait_finished (&server, "jobs", 64, total, total / 10);
  wait_holding (&server, "jobs", 64, workers[1]);
  worker_signal (workers[1], SIGKILL);
  g_subprocess_wait (workers[1]->process, NULL, NULL);
  held = consumer_pending (&server, "jobs", 64, workers[1]->name);
  wait_finished (&server, "jobs", 64, total, total);
  finish_workers (workers, 2, 1, &refused, &skipped);
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
                  "nothing is lost");
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
  wait_finished (&server, "jobs", 64, jobs.total, jobs.total);
  resumed = g_get_monotonic_time ();
  worker_signal (workers[0], SIGCONT);
  finish_workers (workers, 2, -1, &refused, &skipped);

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
  guint64 refused, skipped;
  guint w;

  g_test_summary ("redis-server killed with SIGKILL in the middle and restarted from its AOF: "
                  "the workers reconnect, nothing is lost, each key keeps its order");
  if (!need_redis ())
    return;

  server_start (&server);
  produce (&server, "jobs", 64, scaled (100000), 1000, &jobs);
  for (w = 0; w < 2; w++)
    workers[w] = worker_start (&server, "jobs", w, "--lease-ms=1000", "--batch=256", NULL);
  wait_finished (&server, "jobs", 64, jobs.total, jobs.total * 3 / 10);
  server_kill (&server);
  server_launch (&server);
  wait_finished (&server, "jobs", 64, jobs.total, jobs.total);
  finish_workers (workers, 2, -1, &refused, &skipped);

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
  guint64 refused, skipped;
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
  wait_finished (&server, "jobs", 16, jobs.total, jobs.total);
  finish_workers (workers, 1, -1, &refused, &skipped);

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
  guint64 refused, skipped;
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
  wait_finished (&server, "long", 4, 1, 1);
  finish_workers (workers, 1, -1, &refused, &skipped);

  g_assert_true (g_file_get_contents (workers[0]->log, &log, &length, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (length, >, size);
  g_assert_cmpint (log[length - 1], ==, '\n');
  log[length - 1] = '\0';
  g_assert_null (strchr (log, '\n'));   /* one line */
  fields = g_strsplit (log, " ", -1);
  g_assert_cmpuint (g_strv_length (fields), ==, 6);
  g_assert_cmpstr (fields[2], ==, key);
  g_assert_cmpuint (strlen (fields[3]), ==, size);
  g_assert_true (strspn (fields[3], "p") == size);
  g_assert_cmpstr (fields[4], ==, "1");
  g_assert_cmpstr (fields[5], ==, "ok");

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
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, DEADLINE_US, &error));
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
  queue_progress (&server, "bench", 64, &progress);
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

  redis_server_path = g_find_program_in_path ("redis-server");
  if (redis_server_path == NULL && g_file_test ("/usr/bin/redis-server", G_FILE_TEST_IS_EXECUTABLE))
    redis_server_path = g_strdup ("/usr/bin/redis-server");
  g_assert_nonnull (g_getenv ("KD_REDIS_WORKER"));

  g_test_add_func ("/kd/redis-queue/deadline-fence", test_deadline_fence);
  g_test_add_func ("/kd/redis-queue/in-process", test_in_process);
  g_test_add_func ("/kd/redis-queue/closed", test_closed);
  g_test_add_func ("/kd/redis-queue/workers", test_workers);
  g_test_add_func ("/kd/redis-queue/kill", test_kill);
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
  g_test_add_func ("/kd/redis-queue/long-log-line", test_long_log_line);
  g_test_add_func ("/kd/redis-queue/out-of-range", test_out_of_range);
  g_test_add_func ("/kd/redis-queue/thread-limit", test_thread_limit);
  g_test_add_func ("/kd/redis-queue/bench", test_bench);

  return g_test_run ();
}
