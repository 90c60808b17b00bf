/* redis-worker.c: many processes share keyed jobs through Redis, in per-key order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Start it N times, on one machine or many, against the same Redis server:
 * each process owns a share of the queue's shards and runs their jobs, each
 * key's in the order they were added. Kill one and the others take its
 * shards over; nothing is lost. Add jobs with the producer mode.
 *
 *   redis-worker --port 6379 --log worker-1.log &        # a worker (Ctrl-C stops it)
 *   redis-worker --port 6379 --produce 100000 --keys 1000  # a producer
 *   redis-worker --port 6379 --bench 1000000 --name bench  # a benchmark
 *
 * --url takes the server as Redis clients do
 * (redis://[[user]:password@]host:port/db, rediss://... for TLS,
 * unix:///path/to/redis.sock, redis+cluster://host:port for any node of a
 * Redis Cluster). --tls (implied by rediss://) with --cacert,
 * and --cert and --key for a client certificate, as redis-cli takes them,
 * set up TLS. A
 * password comes from --password-file (its first line), else from the
 * REDISCLI_AUTH environment variable, as redis-cli reads it, else from the
 * URL: never from an option of its own, which any user of the machine
 * could read in the process list. The user comes from --user, else from
 * the URL. The benchmark passes them on to its workers the same way.
 *
 * The benchmark adds its jobs to an empty queue, then starts --consumers
 * workers (this program again) and waits until they have finished every
 * job: it prints the rate of each phase.
 *
 * A job's payload is its number among its key's jobs, counting from 1; a
 * worker logs one line per job it runs (with --log), as the job ends:
 *
 *   <start, us> <end, us> <key> <number> <attempt> <ok|fail> <fencing token>
 *
 * (monotonic times) so that the per-key order, and that a key's runs never
 * overlap, can be checked across the workers' logs (the monotonic clock is
 * shared by the processes of one machine).
 */

#include <errno.h>
#include <fcntl.h>
#include <glib-unix.h>
#include <kdispatch/kdispatch.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct
{
  int         log_fd;
  GMutex      log_lock;   /* one line at a time, even one written in pieces */
  char       *fail_key;
  gint64      work_us;
  gint        stop_at;
  gint        jobs_run;   /* atomic */
} Worker;

static char   *opt_url = NULL;
static char   *opt_user = NULL;
static char   *opt_password_file = NULL;
static gboolean opt_tls = FALSE;
static char   *opt_cacert = NULL;
static char   *opt_cert = NULL;
static char   *opt_key = NULL;
static char   *opt_host = NULL;
static int     opt_port = 6379;
static char   *opt_name = NULL;
static int     opt_shards = 64;
static int     opt_lease_ms = 5000;
static int     opt_batch = 1024;
static int     opt_workers = 2;
static int     opt_attempts = 3;
static int     opt_retry_ms = 100;
static char   *opt_log = NULL;
static char   *opt_fail_key = NULL;
static int     opt_work_us = 0;
static int     opt_produce = 0;
static int     opt_keys = 1000;
static int     opt_unkeyed = 0;
static int     opt_bench = 0;
static int     opt_consumers = 2;
static int     opt_stop_at = 0;

static GOptionEntry options[] = {
  { "url", 0, 0, G_OPTION_ARG_STRING, &opt_url, "Redis server, or a node of a Redis Cluster (redis+cluster://), as a URL (instead of --host and --port)",
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]" },
  { "user", 0, 0, G_OPTION_ARG_STRING, &opt_user, "Redis ACL user (the password from "
    "--password-file or REDISCLI_AUTH)", "USER" },
  { "password-file", 0, 0, G_OPTION_ARG_FILENAME, &opt_password_file, "Read the Redis password from "
    "the first line of FILE (else REDISCLI_AUTH, else the URL's)", "FILE" },
  { "tls", 0, 0, G_OPTION_ARG_NONE, &opt_tls, "Connect with TLS (as rediss:// does)", NULL },
  { "cacert", 0, 0, G_OPTION_ARG_FILENAME, &opt_cacert, "TLS: trust the CAs of FILE (PEM) instead "
    "of the system's", "FILE" },
  { "cert", 0, 0, G_OPTION_ARG_FILENAME, &opt_cert, "TLS: the client certificate (PEM)", "FILE" },
  { "key", 0, 0, G_OPTION_ARG_FILENAME, &opt_key, "TLS: the client certificate's key (PEM)", "FILE" },
  { "host", 0, 0, G_OPTION_ARG_STRING, &opt_host, "Redis host (127.0.0.1)", "HOST" },
  { "port", 0, 0, G_OPTION_ARG_INT, &opt_port, "Redis port (6379)", "PORT" },
  { "name", 0, 0, G_OPTION_ARG_STRING, &opt_name, "Queue name (jobs)", "NAME" },
  { "shards", 0, 0, G_OPTION_ARG_INT, &opt_shards, "Number of shards (64)", "P" },
  { "lease-ms", 0, 0, G_OPTION_ARG_INT, &opt_lease_ms, "Lease time in ms (5000)", "MS" },
  { "batch", 0, 0, G_OPTION_ARG_INT, &opt_batch, "Entries in flight per process (1024)", "N" },
  { "workers", 0, 0, G_OPTION_ARG_INT, &opt_workers, "Worker threads (2)", "N" },
  { "attempts", 0, 0, G_OPTION_ARG_INT, &opt_attempts, "Attempts per job before the dead-letter stream (3)", "N" },
  { "retry-ms", 0, 0, G_OPTION_ARG_INT, &opt_retry_ms, "First retry delay in ms (100)", "MS" },
  { "log", 0, 0, G_OPTION_ARG_FILENAME, &opt_log, "Append a line per job run to FILE", "FILE" },
  { "fail-key", 0, 0, G_OPTION_ARG_STRING, &opt_fail_key, "The jobs of KEY always fail", "KEY" },
  { "work-us", 0, 0, G_OPTION_ARG_INT, &opt_work_us, "Busy time per job in us (0)", "US" },
  { "produce", 0, 0, G_OPTION_ARG_INT, &opt_produce, "Add N jobs instead of running jobs", "N" },
  { "keys", 0, 0, G_OPTION_ARG_INT, &opt_keys, "Producer: over this many keys (1000)", "K" },
  { "unkeyed", 0, 0, G_OPTION_ARG_INT, &opt_unkeyed, "Producer: also add N unkeyed jobs", "N" },
  { "bench", 0, 0, G_OPTION_ARG_INT, &opt_bench, "Add N jobs to an empty queue, then time workers running them", "N" },
  { "consumers", 0, 0, G_OPTION_ARG_INT, &opt_consumers, "Benchmark: worker processes (2)", "N" },
  { "stop-at", 0, 0, G_OPTION_ARG_INT, &opt_stop_at, "Freeze (SIGSTOP) the whole process inside the Nth job, "
    "after saying so on standard output (for tests: SIGCONT resumes it)", "N" },
  { NULL },
};

static GBytes *
text_bytes (char *text)
{
  return g_bytes_new_take (text, strlen (text));
}

/* Writes all of @buf, however many calls it takes; -1 with errno set on an
 * error. A line longer than a pipe's or a file system's single write may
 * be cut by the kernel, and so needs more than one write(). */
static gssize
write_all (int         fd,
           const char *buf,
           gsize       len)
{
  gsize done = 0;

  while (done < len)
    {
      gssize n = write (fd, buf + done, len - done);

      if (n < 0 && errno == EINTR)
        continue;
      if (n < 0)
        return -1;
      done += (gsize) n;
    }
  return (gssize) done;
}

static gboolean
run_job (KdJob    *job,
         gpointer  user_data,
         GError  **error)
{
  Worker *worker = user_data;
  KdRedisEntry *entry = kd_job_get_item (job);
  const char *key = kd_redis_entry_get_key (entry);
  const char *payload = (const char *) kd_redis_entry_get_payload (entry, NULL);
  gboolean fail = worker->fail_key != NULL && g_strcmp0 (key, worker->fail_key) == 0;
  gint64 start = g_get_monotonic_time ();

  if (worker->work_us > 0)
    {
      gint64 until = start + worker->work_us;

      while (g_get_monotonic_time () < until)
        ;
    }
  /* A test freezes the process with a job under way, whose acknowledgement
   * is then late for sure. */
  if (g_atomic_int_add (&worker->jobs_run, 1) + 1 == worker->stop_at)
    {
      g_print ("redis-worker: stopping inside job %d\n", worker->stop_at);
      raise (SIGSTOP);
    }

  /* The line is written as the job ends, before it counts as done, with
   * one write() (a line too long for one takes more, under the lock, so
   * that no other line lands inside it), so it survives a SIGKILL right
   * after. */
  if (worker->log_fd >= 0)
    {
      g_autoptr (GString) line = g_string_new (NULL);
      gssize written;

      /* Keys and payloads of any size: the line grows to fit them. */
      g_string_printf (line, "%" G_GINT64_FORMAT " %" G_GINT64_FORMAT " %s %s %u %s %" G_GUINT64_FORMAT "\n",
                       start, g_get_monotonic_time (), key != NULL ? key : "-", payload,
                       kd_job_get_attempt (job), fail ? "fail" : "ok",
                       kd_redis_entry_get_fencing_token (entry));
      g_mutex_lock (&worker->log_lock);
      written = write_all (worker->log_fd, line->str, line->len);
      g_mutex_unlock (&worker->log_lock);
      if (written < 0)
        g_error ("Cannot write the log: %s", g_strerror (errno));
    }

  if (fail)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "job %s of %s failed", payload, key);
      return FALSE;
    }
  return TRUE;
}

static gboolean
quit (gpointer loop)
{
  g_main_loop_quit (loop);
  return G_SOURCE_REMOVE;
}

/* The login to use: the password from --password-file, else
 * REDISCLI_AUTH, else the URL's; the user from --user, else the URL's
 * (redis://user:password@host). Exits on a file that cannot be read. */
static void
resolve_login (char **user,
               char **password)
{
  g_autoptr (GUri) uri = opt_url != NULL ? g_uri_parse (opt_url, G_URI_FLAGS_HAS_PASSWORD, NULL) : NULL;
  const char *url_user = uri != NULL && g_uri_get_password (uri) != NULL ? g_uri_get_user (uri) : NULL;

  *user = g_strdup (opt_user != NULL ? opt_user : url_user != NULL && url_user[0] != '\0' ? url_user : NULL);
  if (opt_password_file != NULL)
    {
      g_autoptr (GError) error = NULL;
      char *contents = NULL;

      if (!g_file_get_contents (opt_password_file, &contents, NULL, &error))
        {
          g_printerr ("redis-worker: %s\n", error->message);
          exit (2);
        }
      contents[strcspn (contents, "\r\n")] = '\0';
      *password = contents;
    }
  else if (g_getenv ("REDISCLI_AUTH") != NULL)
    *password = g_strdup (g_getenv ("REDISCLI_AUTH"));
  else
    *password = uri != NULL ? g_strdup (g_uri_get_password (uri)) : NULL;
}

static KdRedisQueue *
open_queue (void)
{
  KdRedisQueue *queue = kd_redis_queue_new (opt_name != NULL ? opt_name : "jobs");
  g_autofree char *user = NULL, *password = NULL;
  g_autoptr (GError) error = NULL;

  resolve_login (&user, &password);

  if (opt_url != NULL)
    {
      if (!kd_redis_queue_set_url (queue, opt_url, &error))
        {
          g_printerr ("redis-worker: --url: %s\n", error->message);
          exit (2);
        }
    }
  else
    {
      kd_redis_queue_set_address (queue, opt_host != NULL ? opt_host : "127.0.0.1",
                                  (guint) opt_port);
    }
  if (password != NULL)
    kd_redis_queue_set_credentials (queue, user, password);
  else if (user != NULL)
    {
      g_printerr ("redis-worker: --user needs a password (--password-file or REDISCLI_AUTH)\n");
      exit (2);
    }
  if (opt_key != NULL && opt_cert == NULL)
    {
      g_printerr ("redis-worker: --key needs --cert\n");
      exit (2);
    }
  if ((opt_tls || opt_cacert != NULL || opt_cert != NULL) &&
      !kd_redis_queue_set_tls (queue, opt_cacert, opt_cert, opt_key, &error))
    {
      g_printerr ("redis-worker: TLS: %s\n", error->message);
      exit (2);
    }
  kd_redis_queue_set_n_shards (queue, (guint) opt_shards);
  kd_redis_queue_set_lease_time (queue, (gint64) opt_lease_ms * 1000);
  kd_redis_queue_set_batch_size (queue, (guint) opt_batch);
  kd_redis_queue_set_retry (queue, (guint) opt_attempts, (gint64) opt_retry_ms * 1000,
                            MAX ((gint64) opt_retry_ms * 1000 * 8, (gint64) opt_retry_ms * 1000));
  return queue;
}

/* --produce jobs over --keys keys, each key's numbered from 1, in a
 * shuffled order of keys, then --unkeyed unkeyed jobs. */
static void
make_jobs (guint       n_keyed,
           guint       n_unkeyed,
           GPtrArray  *keys,
           GPtrArray  *payloads)
{
  g_autofree guint *next = g_new0 (guint, (gsize) opt_keys);
  GRand *rand = g_rand_new_with_seed (7);
  guint i;

  for (i = 0; i < n_keyed + n_unkeyed; i++)
    {
      if (i < n_keyed)
        {
          guint k = (guint) g_rand_int_range (rand, 0, opt_keys);

          g_ptr_array_add (keys, g_strdup_printf ("key-%u", k));
          g_ptr_array_add (payloads, text_bytes (g_strdup_printf ("%u", ++next[k])));
        }
      else
        {
          g_ptr_array_add (keys, NULL);
          g_ptr_array_add (payloads, text_bytes (g_strdup_printf ("%u", i - n_keyed + 1)));
        }
    }
  g_rand_free (rand);
}

/* Adds the jobs; returns how long it took, or -1 after an error. */
static gint64
add_jobs (KdRedisQueue *queue,
          GPtrArray    *keys,
          GPtrArray    *payloads)
{
  g_autoptr (GError) error = NULL;
  gint64 start = g_get_monotonic_time ();

  if (!kd_redis_queue_add_many (queue, keys->len, (const char **) keys->pdata,
                                (GBytes **) payloads->pdata, &error))
    {
      g_printerr ("redis-worker: %s\n", error->message);
      return -1;
    }
  return g_get_monotonic_time () - start;
}

static int
produce (void)
{
  g_autoptr (KdRedisQueue) queue = open_queue ();
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  gint64 took;

  make_jobs ((guint) opt_produce, (guint) opt_unkeyed, keys, payloads);
  took = add_jobs (queue, keys, payloads);
  if (took < 0)
    return 1;
  g_print ("redis-worker: added %u jobs in %.2f s\n", keys->len, (double) took / G_USEC_PER_SEC);
  return 0;
}

static void
print_rate (const char *what,
            guint       n_jobs,
            gint64      took)
{
  g_print ("redis-worker: %s %u jobs in %.3f s: %.0f jobs/s\n", what, n_jobs,
           (double) took / G_USEC_PER_SEC, (double) n_jobs * G_USEC_PER_SEC / (double) MAX (took, 1));
}

/* Prints the next line a worker wrote; FALSE at its end. */
static gboolean
print_line (GDataInputStream *output)
{
  g_autofree char *line = g_data_input_stream_read_line_utf8 (output, NULL, NULL, NULL);

  if (line == NULL)
    return FALSE;
  g_print ("%s\n", line);
  return TRUE;
}

/* The benchmark: adds --bench jobs (and --unkeyed) to an empty queue,
 * starts --consumers workers, this program again with the same settings,
 * and waits until the queue's backlog is empty: what is timed is from the
 * workers' start (so it includes their joining the queue and dividing the
 * shards) to the last job's acknowledgement. */
static int
bench (const char *program)
{
  g_autoptr (KdRedisQueue) queue = open_queue ();
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GPtrArray) workers = g_ptr_array_new_with_free_func (g_object_unref);
  g_autoptr (GPtrArray) outputs = g_ptr_array_new_with_free_func (g_object_unref);
  g_autoptr (GError) error = NULL;
  guint64 backlog;
  gint64 took, start;
  int i, status = 0;

  if (!kd_redis_queue_get_backlog (queue, &backlog, &error))
    {
      g_printerr ("redis-worker: %s\n", error->message);
      return 1;
    }
  if (backlog > 0)
    {
      g_printerr ("redis-worker: queue %s holds %" G_GUINT64_FORMAT " unfinished jobs; "
                  "benchmark an empty queue (--name)\n", kd_redis_queue_get_name (queue), backlog);
      return 1;
    }

  make_jobs ((guint) opt_bench, (guint) opt_unkeyed, keys, payloads);
  took = add_jobs (queue, keys, payloads);
  if (took < 0)
    return 1;
  print_rate ("added", keys->len, took);

  start = g_get_monotonic_time ();
  for (i = 0; i < opt_consumers; i++)
    {
      g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
      g_autoptr (GSubprocessLauncher) launcher = g_subprocess_launcher_new (G_SUBPROCESS_FLAGS_STDOUT_PIPE);
      g_autofree char *user = NULL, *password = NULL;
      GSubprocess *worker;

      /* The same server and login: the URL without its credentials, the
       * user as an option, the password through the environment, never on
       * the command line. */
      resolve_login (&user, &password);
      g_ptr_array_add (args, g_strdup (program));
      if (opt_url != NULL)
        {
          g_autoptr (GUri) uri = g_uri_parse (opt_url, G_URI_FLAGS_HAS_PASSWORD, NULL);
          g_autofree char *bare = uri != NULL ? g_uri_to_string_partial (uri, G_URI_HIDE_USERINFO)
                                              : g_strdup (opt_url);

          g_ptr_array_add (args, g_strdup_printf ("--url=%s", bare));
        }
      else
        {
          g_ptr_array_add (args, g_strdup_printf ("--host=%s",
                                                  opt_host != NULL ? opt_host : "127.0.0.1"));
          g_ptr_array_add (args, g_strdup_printf ("--port=%d", opt_port));
        }
      if (user != NULL)
        g_ptr_array_add (args, g_strdup_printf ("--user=%s", user));
      if (opt_tls)
        g_ptr_array_add (args, g_strdup ("--tls"));
      if (opt_cacert != NULL)
        g_ptr_array_add (args, g_strdup_printf ("--cacert=%s", opt_cacert));
      if (opt_cert != NULL)
        g_ptr_array_add (args, g_strdup_printf ("--cert=%s", opt_cert));
      if (opt_key != NULL)
        g_ptr_array_add (args, g_strdup_printf ("--key=%s", opt_key));
      if (password != NULL)
        g_subprocess_launcher_setenv (launcher, "REDISCLI_AUTH", password, TRUE);
      g_ptr_array_add (args, g_strdup_printf ("--name=%s", kd_redis_queue_get_name (queue)));
      g_ptr_array_add (args, g_strdup_printf ("--shards=%d", opt_shards));
      g_ptr_array_add (args, g_strdup_printf ("--lease-ms=%d", opt_lease_ms));
      g_ptr_array_add (args, g_strdup_printf ("--batch=%d", opt_batch));
      g_ptr_array_add (args, g_strdup_printf ("--workers=%d", opt_workers));
      g_ptr_array_add (args, NULL);
      worker = g_subprocess_launcher_spawnv (launcher, (const char * const *) args->pdata, &error);

      if (worker == NULL)
        {
          g_printerr ("redis-worker: %s\n", error->message);
          status = 1;
          break;
        }
      g_ptr_array_add (workers, worker);
      g_ptr_array_add (outputs, g_data_input_stream_new (g_subprocess_get_stdout_pipe (worker)));
    }
  /* A worker handles SIGTERM once it says it consumes (its first line):
   * until then the signal would kill it. */
  for (i = 0; status == 0 && i < (int) outputs->len; i++)
    if (!print_line (g_ptr_array_index (outputs, i)))
      status = 1;
  if (status == 0 && !kd_redis_queue_wait_backlog (queue, 0, -1, &error))
    {
      g_printerr ("redis-worker: %s\n", error->message);
      status = 1;
    }
  if (status == 0)
    print_rate ("ran", keys->len, g_get_monotonic_time () - start);

  for (i = 0; i < (int) workers->len; i++)
    g_subprocess_send_signal (g_ptr_array_index (workers, i), SIGTERM);
  for (i = 0; i < (int) workers->len; i++)
    {
      /* Its counters, then its end. */
      while (print_line (g_ptr_array_index (outputs, i)))
        ;
      g_clear_error (&error);
      if (!g_subprocess_wait_check (g_ptr_array_index (workers, i), NULL, &error))
        {
          g_printerr ("redis-worker: a worker: %s\n", error->message);
          status = 1;
        }
    }
  return status;
}

static int
consume (void)
{
  g_autoptr (KdRedisQueue) queue = open_queue ();
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GMainLoop) loop = g_main_loop_new (NULL, FALSE);
  g_autoptr (GError) error = NULL;
  Worker worker = { .log_fd = -1, .fail_key = opt_fail_key, .work_us = opt_work_us,
                    .stop_at = opt_stop_at };
  KdRedisQueueStats stats;

  g_mutex_init (&worker.log_lock);
  if (opt_log != NULL)
    {
      worker.log_fd = open (opt_log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
      if (worker.log_fd < 0)
        {
          g_printerr ("redis-worker: %s: %s\n", opt_log, g_strerror (errno));
          return 1;
        }
    }

  dispatcher = kd_redis_queue_new_dispatcher (queue, (guint) opt_workers, run_job, &worker, NULL);
  if (!kd_redis_queue_start (queue, &error))
    {
      g_printerr ("redis-worker: %s\n", error->message);
      return 1;
    }
  /* Handled before it says it consumes: whoever waits for that line may
   * stop it at once. */
  g_unix_signal_add (SIGINT, quit, loop);
  g_unix_signal_add (SIGTERM, quit, loop);
  g_print ("redis-worker: %s consuming %s\n", kd_redis_queue_get_consumer_name (queue),
           kd_redis_queue_get_name (queue));
  g_main_loop_run (loop);

  kd_redis_queue_stop (queue);
  kd_redis_queue_get_stats (queue, &stats);
  g_print ("redis-worker: ran %d read %" G_GUINT64_FORMAT " claimed %" G_GUINT64_FORMAT
           " acked %" G_GUINT64_FORMAT " dead %" G_GUINT64_FORMAT " refused %" G_GUINT64_FORMAT
           " skipped %" G_GUINT64_FORMAT " trimmed %" G_GUINT64_FORMAT " duplicates %" G_GUINT64_FORMAT "\n",
           g_atomic_int_get (&worker.jobs_run), stats.read, stats.claimed, stats.acked,
           stats.dead_lettered, stats.refused, stats.skipped, stats.trimmed, stats.duplicates);
  if (worker.log_fd >= 0)
    close (worker.log_fd);
  g_mutex_clear (&worker.log_lock);
  return 0;
}

int
main (int   argc,
      char *argv[])
{
  g_autoptr (GOptionContext) context = g_option_context_new ("- run or add kdispatch jobs shared through Redis");
  g_autoptr (GError) error = NULL;

  g_option_context_add_main_entries (context, options, NULL);
  if (!g_option_context_parse (context, &argc, &argv, &error))
    {
      g_printerr ("redis-worker: %s\n", error->message);
      return 2;
    }
  if (opt_port <= 0 || opt_port > 65535 || opt_shards < 1 || opt_lease_ms < 30 || opt_batch < 1 ||
      opt_workers < 0 || opt_attempts < 1 || opt_retry_ms < 0 || opt_keys < 1 || opt_produce < 0 ||
      opt_unkeyed < 0 || opt_bench < 0 || opt_consumers < 1 || opt_stop_at < 0)
    {
      g_printerr ("redis-worker: an option is out of range (see --help)\n");
      return 2;
    }
  /* Output goes to a log file when run by a test: one line at a time. */
  setvbuf (stdout, NULL, _IOLBF, 0);

  if (opt_bench > 0)
    return bench (argv[0]);
  return opt_produce > 0 || opt_unkeyed > 0 ? produce () : consume ();
}
