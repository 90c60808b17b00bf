/* kd-redis-harness.c: a redis-server, worker processes and their logs, for test-redis-queue.c
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
 * deadline, KD_REDIS_TEST_DEADLINE_US (kd-redis-harness.h), past which the test
 * fails.
 *
 * The looks at what a queue holds, and the waits on them, go through a
 * Place (kd-redis-harness.h) to the node holding each stream: a lone
 * server holds them all, and kd-redis-cluster-harness.c makes a cluster's
 * masters a Place, so that the same looks serve a cluster's queues.
 *
 * A server with @tls also listens with TLS on a port of its own, with
 * certificates openssl makes for it (a CA, the server's, a client's), and
 * asks clients for theirs: the queues open_queue() makes and the worker
 * processes connect there, the harness's own looks at the server keep to
 * the plain port.
 */

#include "config.h"

#include <errno.h>
#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kd-redis-harness.h"
#include "kd-test-util.h"

/* ---- Certificates made with openssl ------------------------------------ */

gboolean
need_openssl (void)
{
  g_autofree char *openssl = g_find_program_in_path ("openssl");

  if (openssl == NULL)
    {
      g_test_skip ("openssl is not installed (Debian: apt-get install openssl)");
      return FALSE;
    }
  return TRUE;
}

/* What a TLS server of these tests needs: redis-server, openssl and GIO's
 * TLS backend. */
gboolean
need_tls (void)
{
  if (!need_redis () || !need_openssl ())
    return FALSE;
  if (!g_tls_backend_supports_tls (g_tls_backend_get_default ()))
    {
      g_test_skip ("GIO has no TLS backend (Debian: apt-get install glib-networking)");
      return FALSE;
    }
  return TRUE;
}

static void
run_openssl (const char *dir,
             const char *first,
             ...)
{
  g_autoptr (GPtrArray) argv = g_ptr_array_new ();
  g_autofree char *err = NULL;
  g_autoptr (GError) error = NULL;
  const char *arg;
  gint status;
  va_list ap;

  g_ptr_array_add (argv, (gpointer) "openssl");
  va_start (ap, first);
  for (arg = first; arg != NULL; arg = va_arg (ap, const char *))
    g_ptr_array_add (argv, (gpointer) arg);
  va_end (ap);
  g_ptr_array_add (argv, NULL);
  g_spawn_sync (dir, (char **) argv->pdata, NULL, G_SPAWN_SEARCH_PATH | G_SPAWN_STDOUT_TO_DEV_NULL,
                NULL, NULL, NULL, &err, &status, &error);
  g_assert_no_error (error);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("openssl %s failed: %s", first, err);
}

/* A key and a certificate signed by @ca (its .crt and .key) with the
 * extensions @ext, named NAME.crt and NAME.key in @dir. */
static void
make_signed (const char *dir,
             const char *name,
             const char *ca,
             const char *ext)
{
  g_autofree char *key = g_strdup_printf ("%s.key", name);
  g_autofree char *csr = g_strdup_printf ("%s.csr", name);
  g_autofree char *crt = g_strdup_printf ("%s.crt", name);
  g_autofree char *ca_crt = g_strdup_printf ("%s.crt", ca);
  g_autofree char *ca_key = g_strdup_printf ("%s.key", ca);
  g_autofree char *ext_file = g_build_filename (dir, "ext.cnf", NULL);
  g_autofree char *subject = g_strdup_printf ("/CN=kdispatch test %s", name);
  g_autoptr (GError) error = NULL;

  g_file_set_contents (ext_file, ext, -1, &error);
  g_assert_no_error (error);
  run_openssl (dir, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
               "-keyout", key, "-out", csr, "-subj", subject, NULL);
  run_openssl (dir, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
               "-out", crt, "-days", "2", "-extfile", "ext.cnf", NULL);
}

static void
make_ca (const char *dir,
         const char *name)
{
  g_autofree char *key = g_strdup_printf ("%s.key", name);
  g_autofree char *crt = g_strdup_printf ("%s.crt", name);
  g_autofree char *subject = g_strdup_printf ("/CN=kdispatch test %s", name);

  run_openssl (dir, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
               "-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", subject,
               "-addext", "basicConstraints=critical,CA:TRUE",
               "-addext", "keyUsage=critical,keyCertSign,cRLSign", NULL);
}

/* Makes the files of @files in @dir. */
void
tls_files_make (TlsFiles   *files,
                const char *dir)
{
  make_ca (dir, "ca");
  make_ca (dir, "other-ca");
  make_signed (dir, "server", "ca",
               "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
               "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n");
  make_signed (dir, "client", "ca",
               "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n");
  files->ca = g_build_filename (dir, "ca.crt", NULL);
  files->other_ca = g_build_filename (dir, "other-ca.crt", NULL);
  files->server_cert = g_build_filename (dir, "server.crt", NULL);
  files->server_key = g_build_filename (dir, "server.key", NULL);
  files->client_cert = g_build_filename (dir, "client.crt", NULL);
  files->client_key = g_build_filename (dir, "client.key", NULL);
}

void
tls_files_clear (TlsFiles *files)
{
  g_clear_pointer (&files->ca, g_free);
  g_clear_pointer (&files->other_ca, g_free);
  g_clear_pointer (&files->server_cert, g_free);
  g_clear_pointer (&files->server_key, g_free);
  g_clear_pointer (&files->client_cert, g_free);
  g_clear_pointer (&files->client_key, g_free);
}

/* ---- A redis-server of our own ----------------------------------------- */

static char *redis_server_path;

/* Finds redis-server, for need_redis(); call once, from main(). */
void
find_redis_server (void)
{
  redis_server_path = g_find_program_in_path ("redis-server");
  if (redis_server_path == NULL && g_file_test ("/usr/bin/redis-server", G_FILE_TEST_IS_EXECUTABLE))
    redis_server_path = g_strdup ("/usr/bin/redis-server");
}

gboolean
need_redis (void)
{
  if (redis_server_path == NULL)
    {
      g_test_skip ("redis-server is not installed (Debian: apt-get install redis-server)");
      return FALSE;
    }
  return TRUE;
}

/* Children die with the test, even when an assertion aborts it: a
 * GSpawnChildSetupFunc. */
void
die_with_parent (gpointer data)
{
  prctl (PR_SET_PDEATHSIG, SIGKILL);
}

/* A TCP port of 127.0.0.1 that nothing listens on right now. */
guint
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

redisContext *
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
void
server_launch (Server *server)
{
  g_autoptr (GSubprocessLauncher) launcher = g_subprocess_launcher_new (G_SUBPROCESS_FLAGS_NONE);
  g_autoptr (GError) error = NULL;
  g_autofree char *port = g_strdup_printf ("%u", server->port);
  g_autofree char *tls_port = g_strdup_printf ("%u", server->tls_port);
  g_autofree char *log = g_build_filename (server->dir, "redis.log", NULL);
  g_autofree char *notify_path = g_build_filename (server->dir, "notify.sock", NULL);
  struct sockaddr_un address = { .sun_family = AF_UNIX };
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;
  int notify = socket (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);

  g_assert_cmpint (notify, >=, 0);
  g_assert_cmpuint (strlen (notify_path), <, sizeof address.sun_path);
  strcpy (address.sun_path, notify_path);
  unlink (notify_path);
  g_assert_cmpint (bind (notify, (struct sockaddr *) &address, sizeof address), ==, 0);

  g_subprocess_launcher_set_child_setup (launcher, die_with_parent, NULL, NULL);
  g_subprocess_launcher_setenv (launcher, "NOTIFY_SOCKET", notify_path, TRUE);
  {
    const char *fixed[] = { redis_server_path,
                            "--port", port, "--bind", "127.0.0.1",
                            "--dir", server->dir, "--appendonly", "yes",
                            "--appendfsync", server->fsync_always ? "always" : "everysec",
                            "--notify-keyspace-events", "Et", "--save", "",
                            "--supervised", "systemd", "--logfile", log };
    g_autoptr (GPtrArray) argv = g_ptr_array_new ();
    guint i;

    for (i = 0; i < G_N_ELEMENTS (fixed); i++)
      g_ptr_array_add (argv, (gpointer) fixed[i]);
    if (server->tls)
      {
        g_ptr_array_add (argv, (gpointer) "--tls-port");
        g_ptr_array_add (argv, tls_port);
        g_ptr_array_add (argv, (gpointer) "--tls-cert-file");
        g_ptr_array_add (argv, server->tls_files.server_cert);
        g_ptr_array_add (argv, (gpointer) "--tls-key-file");
        g_ptr_array_add (argv, server->tls_files.server_key);
        g_ptr_array_add (argv, (gpointer) "--tls-ca-cert-file");
        g_ptr_array_add (argv, server->tls_files.ca);
        g_ptr_array_add (argv, (gpointer) "--tls-auth-clients");
        g_ptr_array_add (argv, (gpointer) "yes");
      }
    for (i = 0; server->extra_args != NULL && server->extra_args[i] != NULL; i++)
      g_ptr_array_add (argv, (gpointer) server->extra_args[i]);
    g_ptr_array_add (argv, NULL);
    server->process = g_subprocess_launcher_spawnv (launcher, (const char * const *) argv->pdata,
                                                    &error);
  }
  g_assert_no_error (error);

  for (;;)
    {
      struct pollfd ready = { notify, POLLIN, 0 };
      gint64 left = deadline - g_get_monotonic_time ();
      char message[512];
      ssize_t len;

      g_assert_cmpint (left, >, 0);
      if (poll (&ready, 1, (int) (left / 1000)) == 0)
        g_error ("redis-server did not say READY=1 in %d s (see %s)", (int) (KD_REDIS_TEST_DEADLINE_US / G_USEC_PER_SEC), log);
      len = recv (notify, message, sizeof message - 1, 0);
      g_assert_cmpint (len, >=, 0);
      message[len] = '\0';
      if (strstr (message, "READY=1") != NULL)
        break;
    }
  close (notify);
  unlink (notify_path);
}

void
server_start (Server *server)
{
  g_autoptr (GError) error = NULL;

  server->dir = g_dir_make_tmp ("kd-redis-XXXXXX", &error);
  g_assert_no_error (error);
  server->place = (Place) { .nodes = server, .n_nodes = 1 };
  server->port = free_port ();
  if (server->tls)
    {
      tls_files_make (&server->tls_files, server->dir);
      do
        server->tls_port = free_port ();
      while (server->tls_port == server->port);
    }
  server_launch (server);
}

/* Stops redis-server now. g_subprocess_send_signal() only hands the signal
 * to GLib's worker thread, which sends it later, so what the test does next
 * could still reach a running server: send it here, and wait until the
 * server is stopped (without reaping anything: WNOWAIT). */
void
server_freeze (Server *server)
{
  pid_t pid = (pid_t) g_ascii_strtoll (g_subprocess_get_identifier (server->process), NULL, 10);
  siginfo_t info = { 0 };

  g_assert_cmpint (kill (pid, SIGSTOP), ==, 0);
  g_assert_cmpint (waitid (P_PID, pid, &info, WSTOPPED | WNOWAIT), ==, 0);
  g_assert_cmpint (info.si_code, ==, CLD_STOPPED);
}

void
server_kill (Server *server)
{
  g_subprocess_send_signal (server->process, SIGKILL);
  g_subprocess_wait (server->process, NULL, NULL);
  g_clear_object (&server->process);
}

/* Removes @path and what it holds, two levels deep (Redis 7 keeps its AOF
 * in a directory of its own). */
void
remove_dir (const char *path)
{
  g_autoptr (GFile) dir = g_file_new_for_path (path);
  g_autoptr (GFileEnumerator) children = NULL;
  GFileInfo *info;

  children = g_file_enumerate_children (dir, G_FILE_ATTRIBUTE_STANDARD_NAME, G_FILE_QUERY_INFO_NONE, NULL, NULL);
  while (children != NULL && (info = g_file_enumerator_next_file (children, NULL, NULL)) != NULL)
    {
      g_autoptr (GFile) child = g_file_get_child (dir, g_file_info_get_name (info));
      g_autoptr (GFileEnumerator) grand = g_file_enumerate_children (child, G_FILE_ATTRIBUTE_STANDARD_NAME,
                                                                     G_FILE_QUERY_INFO_NONE, NULL, NULL);
      GFileInfo *sub;

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
}

void
server_stop (Server *server)
{
  server_kill (server);
  remove_dir (server->dir);
  g_free (server->dir);
  tls_files_clear (&server->tls_files);
}

KdRedisQueue *
open_queue (Server     *server,
            const char *name,
            guint       n_shards)
{
  KdRedisQueue *queue = kd_redis_queue_new (name);

  if (server->tls)
    {
      g_autoptr (GError) error = NULL;

      kd_redis_queue_set_address (queue, "127.0.0.1", server->tls_port);
      g_assert_true (kd_redis_queue_set_tls (queue, server->tls_files.ca, server->tls_files.client_cert,
                                             server->tls_files.client_key, &error));
      g_assert_no_error (error);
    }
  else
    kd_redis_queue_set_address (queue, "127.0.0.1", server->port);
  kd_redis_queue_set_n_shards (queue, n_shards);
  return queue;
}

/* ---- Running a queue's jobs in this process ------------------------------ */

void
seen_init (Seen *seen)
{
  memset (seen, 0, sizeof *seen);
  g_mutex_init (&seen->lock);
  seen->last = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
}

void
seen_clear (Seen *seen)
{
  g_hash_table_unref (seen->last);
  g_mutex_clear (&seen->lock);
}

/* A handler (its data a Seen): checks the entry, and that each key's
 * numbers come in order. */
gboolean
seen_record (KdJob    *job,
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
  if (seen == NULL)
    return TRUE;
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

/* Runs @queue's jobs in this process with seen_record() until none is
 * left, then stops it and waits for its dispatcher. */
void
run_until_done (KdRedisQueue *queue,
                guint         n_workers,
                Seen         *seen)
{
  g_autoptr (KdDispatcher) dispatcher = kd_redis_queue_new_dispatcher (queue, n_workers,
                                                                      seen_record, seen, NULL);
  g_autoptr (GError) error = NULL;

  g_assert_true (kd_redis_queue_start (queue, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (queue, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  kd_redis_queue_stop (queue);
  kd_dispatcher_wait (dispatcher);
}

/* ---- What the queue holds ---------------------------------------------- */

/* The stream of shard @shard of queue @name; -1: the unkeyed one. */
char *
stream_name (const char *name,
             gint        shard)
{
  return shard < 0 ? g_strdup_printf ("%s:{u}", name) : g_strdup_printf ("%s:{%d}", name, shard);
}

/* The connections of one look at a queue's streams: per stream (the
 * shards' in order, then the unkeyed one) the node of @place holding it,
 * and a connection per node, opened as needed. */
typedef struct
{
  Place         *place;
  guint          n_shards;
  gint          *node_of;
  redisContext **nodes;
} Route;

static Route *
route_new (Place      *place,
           const char *name,
           guint       n_shards)
{
  Route *route = g_new0 (Route, 1);

  route->place = place;
  route->n_shards = n_shards;
  route->node_of = g_new0 (gint, n_shards + 1);
  route->nodes = g_new0 (redisContext *, place->n_nodes);
  if (place->locate != NULL)
    place->locate (place, name, n_shards, route->node_of);
  return route;
}

/* The connection to the node holding shard @shard's stream (-1: the
 * unkeyed one's). */
static redisContext *
route_stream (Route *route,
              gint   shard)
{
  gint node = route->node_of[shard < 0 ? (gint) route->n_shards : shard];

  if (route->nodes[node] == NULL)
    {
      route->nodes[node] = server_connect (&route->place->nodes[node]);
      if (route->nodes[node] == NULL)
        g_error ("redis-server on port %u does not answer", route->place->nodes[node].port);
    }
  return route->nodes[node];
}

static void
route_free (Route *route)
{
  guint i;

  for (i = 0; i < route->place->n_nodes; i++)
    g_clear_pointer (&route->nodes[i], redisFree);
  g_free (route->nodes);
  g_free (route->node_of);
  g_free (route);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC (Route, route_free)

static KdRedisQueue *
place_open_queue (Place      *place,
                  const char *name,
                  guint       n_shards)
{
  if (place->open_queue != NULL)
    return place->open_queue (place, name, n_shards);
  return open_queue (&place->nodes[0], name, n_shards);
}

/* Sends @format (a command, with %s for the stream) for each stream of the
 * queue, the unkeyed one first, to the node holding it, in one round trip
 * per node, and hands each reply to @each. */
static void
each_stream (Place       *place,
             const char  *name,
             guint        n_shards,
             const char  *format,
             void       (*each) (const redisReply *reply,
                                 gpointer          data),
             gpointer     data)
{
  g_autoptr (Route) route = route_new (place, name, n_shards);
  gint shard;

  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);

      redisAppendCommand (route_stream (route, shard), format, stream);
    }
  /* Each node answers in the order it was asked. */
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);
      redisReply *reply = NULL;

      g_assert_cmpint (redisGetReply (route_stream (route, shard), (void **) &reply), ==, REDIS_OK);
      if (reply->type == REDIS_REPLY_ERROR)
        g_error ("%s on %s: %s", format, stream, reply->str);
      each (reply, data);
      freeReplyObject (reply);
    }
}

typedef struct
{
  const char *consumer;
  guint64     count;
} Counting;

void
queue_progress (Place      *place,
                const char *name,
                guint       n_shards,
                Progress   *progress)
{
  g_autoptr (Route) route = route_new (place, name, n_shards);
  /* The groups whose lag Redis does not know: their streams' shards, and
   * the ids after their last delivered ones. */
  g_autoptr (GArray) unknown_shards = g_array_new (FALSE, FALSE, sizeof (gint));
  g_autoptr (GPtrArray) unknown = g_ptr_array_new_with_free_func (g_free);
  gint shard;
  guint i;

  progress->entries = progress->unfinished = 0;
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard);

      redisAppendCommand (route_stream (route, shard), "XLEN %s", stream);
      redisAppendCommand (route_stream (route, shard), "XINFO GROUPS %s", stream);
    }
  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      redisContext *c = route_stream (route, shard);
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
            {
              g_array_append_val (unknown_shards, shard);
              g_ptr_array_add (unknown, g_strdup_printf ("(%s", last));
            }
        }
      freeReplyObject (reply);
    }
  for (i = 0; i < unknown->len; i++)
    {
      gint at = g_array_index (unknown_shards, gint, i);
      g_autofree char *stream = stream_name (name, at);
      redisReply *reply = redisCommand (route_stream (route, at), "XRANGE %s %s +", stream,
                                        (char *) g_ptr_array_index (unknown, i));

      g_assert_nonnull (reply);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
      progress->unfinished += reply->elements;
      freeReplyObject (reply);
    }
}

/* Waits until at least @done of @total jobs are finished (acknowledged or
 * dead-lettered); all of them if @done is @total. */
void
wait_finished (Place      *place,
               const char *name,
               guint       n_shards,
               guint64     total,
               guint64     done)
{
  g_autoptr (KdRedisQueue) queue = place_open_queue (place, name, n_shards);
  g_autoptr (GError) error = NULL;
  Progress progress;

  if (!kd_redis_queue_wait_backlog (queue, total - done, KD_REDIS_TEST_DEADLINE_US, &error))
    {
      queue_progress (place, name, n_shards, &progress);
      g_error ("%" G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT " jobs finished: %s",
               total - progress.unfinished, total, error->message);
    }
  /* The library's count against the test's own. */
  queue_progress (place, name, n_shards, &progress);
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
guint64
consumer_pending (Place      *place,
                  const char *name,
                  guint       n_shards,
                  const char *consumer)
{
  Counting counting = { consumer, 0 };

  each_stream (place, name, n_shards, "XPENDING %s kd", add_pending, &counting);
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
guint64
streams_length (Place      *place,
                const char *name,
                guint       n_shards)
{
  Counting counting = { NULL, 0 };

  each_stream (place, name, n_shards, "XLEN %s", add_length, &counting);
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
guint64
unfinished_present (Place      *place,
                    const char *name,
                    guint       n_shards)
{
  g_autoptr (Route) route = route_new (place, name, n_shards);
  guint64 present = 0;
  gint shard;

  for (shard = -1; shard < (gint) n_shards; shard++)
    {
      redisContext *c = route_stream (route, shard);
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
  return present;
}

/* Waits until @done (@data) holds, looking again after each keyspace event
 * @event (which the test's servers notify) on any node holding one of
 * queue @name's streams: each notifies its own keys' events only. */
static void
wait_keyevent (Place       *place,
               const char  *name,
               guint        n_shards,
               const char  *event,
               gboolean   (*done) (gpointer data),
               gpointer     data,
               const char  *what)
{
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;
  /* Connections of its own: a subscribed one takes no other command. */
  g_autoptr (Route) route = route_new (place, name, n_shards);
  g_autofree struct pollfd *fds = g_new (struct pollfd, place->n_nodes);
  g_autofree redisContext **subscribed = g_new (redisContext *, place->n_nodes);
  guint i, n = 0;
  gint shard;

  /* A connection to each node holding one of the streams, subscribed. */
  for (shard = -1; shard < (gint) n_shards; shard++)
    route_stream (route, shard);
  for (i = 0; i < place->n_nodes; i++)
    if (route->nodes[i] != NULL)
      {
        redisReply *reply = redisCommand (route->nodes[i], "SUBSCRIBE __keyevent@0__:%s", event);

        g_assert_nonnull (reply);
        freeReplyObject (reply);
        subscribed[n] = route->nodes[i];
        fds[n].fd = route->nodes[i]->fd;
        fds[n].events = POLLIN;
        n++;
      }
  /* Subscribed before looking: an event after the look wakes the wait. */
  while (!done (data))
    {
      gint64 left = deadline - g_get_monotonic_time ();
      int ready = left > 0 ? poll (fds, n, (int) (left / 1000) + 1) : 0;

      if (ready < 0 && errno == EINTR)
        continue;
      g_assert_cmpint (ready, >=, 0);
      if (ready == 0)
        g_error ("%s: not in %d s", what, (int) (KD_REDIS_TEST_DEADLINE_US / G_USEC_PER_SEC));
      for (i = 0; i < n; i++)
        if (fds[i].revents != 0)
          {
            redisReply *reply = NULL;

            if (redisBufferRead (subscribed[i]) != REDIS_OK)
              g_error ("%s: %s", what, subscribed[i]->errstr);
            while (redisGetReplyFromReader (subscribed[i], (void **) &reply) == REDIS_OK && reply != NULL)
              g_clear_pointer (&reply, freeReplyObject);
          }
    }
}

typedef struct
{
  Place      *place;
  const char *name;
  guint       n_shards;
  guint64     length;
  const char *consumer;
} Looking;

static gboolean
trimmed_down (gpointer data)
{
  Looking *looking = data;

  return streams_length (looking->place, looking->name, looking->n_shards) <= looking->length;
}

/* Waits until the consumers have trimmed the queue's streams down to
 * @length entries. */
void
wait_trimmed (Place      *place,
              const char *name,
              guint       n_shards,
              guint64     length)
{
  Looking looking = { place, name, n_shards, length, NULL };

  wait_keyevent (place, name, n_shards, "xtrim", trimmed_down, &looking, "trimming the streams");
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

static gboolean
forgotten (gpointer data)
{
  Looking *looking = data;
  Counting counting = { looking->consumer, 0 };

  /* How many of the queue's groups (one per stream) know the consumer. */
  each_stream (looking->place, looking->name, looking->n_shards, "XINFO CONSUMERS %s kd", add_if_known,
               &counting);
  return counting.count == 0;
}

/* Waits until no group of the queue knows @consumer any more. */
void
wait_forgotten (Place      *place,
                const char *name,
                guint       n_shards,
                const char *consumer)
{
  Looking looking = { place, name, n_shards, 0, consumer };

  wait_keyevent (place, name, n_shards, "xgroup-delconsumer", forgotten, &looking,
                 "forgetting a dead consumer");
}

/* ---- Jobs: key-K numbered from 1, in a shuffled order of keys ---------- */

/* Adds @n_jobs jobs over @n_keys keys through @queue, and says in @jobs
 * how many each key got. */
void
produce_into (KdRedisQueue *queue,
              guint         n_jobs,
              guint         n_keys,
              Jobs         *jobs)
{
  g_autoptr (GPtrArray) keys = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GPtrArray) payloads = g_ptr_array_new_with_free_func ((GDestroyNotify) g_bytes_unref);
  g_autoptr (GError) error = NULL;
  GRand *rand = g_rand_new_with_seed (n_jobs + n_keys);
  gboolean ok;
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

  /* The error first: it says why. */
  ok = kd_redis_queue_add_many (queue, keys->len, (const char **) keys->pdata,
                                (GBytes **) payloads->pdata, &error);
  g_assert_no_error (error);
  g_assert_true (ok);
}

void
produce (Server     *server,
         const char *name,
         guint       n_shards,
         guint       n_jobs,
         guint       n_keys,
         Jobs       *jobs)
{
  g_autoptr (KdRedisQueue) queue = open_queue (server, name, n_shards);

  produce_into (queue, n_jobs, n_keys, jobs);
}

/* @n, times KD_TEST_SCALE (the valgrind setup makes sizes smaller), but at
 * least 1,000. */
guint
scaled (guint n)
{
  const char *scale = g_getenv ("KD_TEST_SCALE");
  double factor = scale != NULL ? g_ascii_strtod (scale, NULL) : 1.0;

  return MAX ((guint) (n * (factor > 0 ? factor : 1.0)), 1000);
}

/* ---- Worker processes -------------------------------------------------- */

/* Starts a worker process (examples/redis-worker, KD_REDIS_WORKER) on queue
 * @name, with @connection (NULL-terminated: the options that name the
 * server and how to reach it) and the options in @ap (NULL-terminated),
 * logging its runs to @dir/worker-@index.log; returns once it has joined
 * the queue. */
Worker *
worker_startv (const char         *dir,
               const char * const *connection,
               const char         *name,
               guint               index,
               va_list             ap)
{
  g_autoptr (GSubprocessLauncher) launcher = g_subprocess_launcher_new (G_SUBPROCESS_FLAGS_NONE);
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GError) error = NULL;
  Worker *worker = g_new0 (Worker, 1);
  g_autofree char *first = NULL;
  char consumer[128];
  const char *arg;
  guint i;

  worker->log = g_strdup_printf ("%s/worker-%u.log", dir, index);
  g_ptr_array_add (argv, g_strdup (g_getenv ("KD_REDIS_WORKER")));
  for (i = 0; connection[i] != NULL; i++)
    g_ptr_array_add (argv, g_strdup (connection[i]));
  g_ptr_array_add (argv, g_strdup_printf ("--name=%s", name));
  g_ptr_array_add (argv, g_strdup_printf ("--log=%s", worker->log));
  while ((arg = va_arg (ap, const char *)) != NULL)
    g_ptr_array_add (argv, g_strdup (arg));
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

Worker *
worker_start (Server     *server,
              const char *name,
              guint       index,
              ...)
{
  g_autoptr (GPtrArray) connection = g_ptr_array_new_with_free_func (g_free);
  Worker *worker;
  va_list ap;

  if (server->tls)
    {
      g_ptr_array_add (connection, g_strdup_printf ("--port=%u", server->tls_port));
      g_ptr_array_add (connection, g_strdup_printf ("--cacert=%s", server->tls_files.ca));
      g_ptr_array_add (connection, g_strdup_printf ("--cert=%s", server->tls_files.client_cert));
      g_ptr_array_add (connection, g_strdup_printf ("--key=%s", server->tls_files.client_key));
    }
  else
    g_ptr_array_add (connection, g_strdup_printf ("--port=%u", server->port));
  g_ptr_array_add (connection, NULL);
  va_start (ap, index);
  worker = worker_startv (server->dir, (const char * const *) connection->pdata, name, index, ap);
  va_end (ap);
  return worker;
}

void
worker_signal (Worker *worker,
               int     signum)
{
  g_subprocess_send_signal (worker->process, signum);
}

/* Stops a worker gracefully (or finds it killed), and keeps the rest of its
 * output. */
void
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

void
worker_free (Worker *worker)
{
  g_clear_object (&worker->stdout_lines);
  g_clear_object (&worker->process);
  g_free (worker->log);
  g_free (worker->name);
  g_free (worker->out);
  g_free (worker);
}

guint64
stat_of (const char *out,
         const char *name)
{
  g_autofree char *needle = g_strdup_printf (" %s ", name);
  const char *at = out != NULL ? strstr (out, needle) : NULL;

  return at != NULL ? g_ascii_strtoull (at + strlen (needle), NULL, 10) : 0;
}

/* Finishes the @n_workers workers (@killed, unless -1, was killed) and
 * logs each one's output. */
void
finish_workers (Worker **workers,
                guint    n_workers,
                gint     killed)
{
  guint w;

  for (w = 0; w < n_workers; w++)
    {
      worker_finish (workers[w], (gint) w == killed);
      g_test_message ("worker %u (%s): %s", w, workers[w]->name, workers[w]->out);
    }
}

/* The sum of the finished workers' stat @name. */
guint64
workers_stat (Worker    **workers,
              guint       n_workers,
              const char *name)
{
  guint64 sum = 0;
  guint w;

  for (w = 0; w < n_workers; w++)
    sum += stat_of (workers[w]->out, name);
  return sum;
}

/* Waits until @worker holds entries read and not acknowledged, looking
 * again after each step of the queue's progress. (A broken build that
 * acknowledges on read never holds any: the test fails at the deadline.) */
void
wait_holding (Place      *place,
              const char *name,
              guint       n_shards,
              Worker     *worker)
{
  g_autoptr (KdRedisQueue) queue = place_open_queue (place, name, n_shards);
  g_autoptr (GError) error = NULL;
  guint64 backlog;

  while (consumer_pending (place, name, n_shards, worker->name) == 0)
    {
      g_assert_true (kd_redis_queue_get_backlog (queue, &backlog, &error));
      g_assert_no_error (error);
      g_assert_cmpuint (backlog, >, 0);
      g_assert_true (kd_redis_queue_wait_backlog (queue, backlog - 1, KD_REDIS_TEST_DEADLINE_US, &error));
      g_assert_no_error (error);
    }
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
  guint64  token;      /* its shard's fencing token */
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
void
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
          Run run = { 0, 0, w, i, 0, 0, 0, FALSE, 0, FALSE };
          char key[64], status[8];

          if (lines[i][0] == '\0')
            continue;
          g_assert_cmpint (sscanf (lines[i], "%" G_GINT64_FORMAT " %" G_GINT64_FORMAT " %63s %u %u %7s %"
                                   G_GUINT64_FORMAT, &run.time, &run.end, key, &run.seq, &run.attempt,
                                   status, &run.token), ==, 7);
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

  /* The runs taken over: a later run of the same job in another worker,
   * which another owner of the shard made, under another fencing token
   * (not necessarily a higher one by these stamps: a run is stamped as its
   * handler starts, after the library let it start, and a thread may stall
   * in between, so a stale owner's run can be stamped after its
   * successor's). */
  for (i = 0; i < runs->len; i++)
    {
      Run *run = &g_array_index (runs, Run, i);

      for (k = i + 1; k < runs->len && g_array_index (runs, Run, k).key == run->key && !run->rerun; k++)
        if (g_array_index (runs, Run, k).seq == run->seq && g_array_index (runs, Run, k).file != run->file)
          {
            run->rerun = TRUE;
            if (g_array_index (runs, Run, k).token == run->token)
              g_error ("key-%u: job %u ran again (worker %u) under fencing token %" G_GUINT64_FORMAT
                       ", the first run's %" G_GUINT64_FORMAT, run->key, run->seq,
                       g_array_index (runs, Run, k).file, g_array_index (runs, Run, k).token,
                       run->token);
            verdict->fenced_reruns++;
          }
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
