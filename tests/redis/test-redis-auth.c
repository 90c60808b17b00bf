/* test-redis-auth.c: a Redis URL, a password, ACL users with least privilege
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#include "config.h"

#include <glib/gstdio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-redis-harness.h"
#include "kd-redis-server-private.h"
#include "kd-test-util.h"

/* The least privilege of a queue's processes, as the README lists it: a
 * queue named QUEUE touches the keys QUEUE:* and the channels QUEUE:* only,
 * with the commands its code sends (scripts run with their caller's
 * rights, so the commands they call are listed too). The producer's last
 * two are for kd_redis_queue_trim() only. */
#define PASSWORD "s3:cr@t/%"              /* percent-encoded below */
#define PASSWORD_IN_URL "s3%3Acr%40t%2F%25"

/* Adds jobs @first to @first + @n - 1 of a sequence over 10 keys through
 * @queue: job i is number i / 10 + 1 of key i % 10. */
static gboolean
add_range (KdRedisQueue  *queue,
           guint          first,
           guint          n,
           GError       **error)
{
  guint i;

  for (i = first; i < first + n; i++)
    {
      g_autofree char *key = g_strdup_printf ("key-%u", i % 10);
      g_autofree char *text = g_strdup_printf ("%u", i / 10 + 1);
      g_autoptr (GBytes) payload = g_bytes_new (text, strlen (text));

      if (!kd_redis_queue_add (queue, key, payload, error))
        return FALSE;
    }
  return TRUE;
}

static gboolean
add_jobs (KdRedisQueue  *queue,
          guint          n,
          GError       **error)
{
  return add_range (queue, 0, n, error);
}

/* A queue whose leases never expire during a test: nothing here waits for
 * one, and a loaded machine cannot make a job run twice. */
static KdRedisQueue *
new_queue (const char *name)
{
  KdRedisQueue *queue = kd_redis_queue_new (name);

  kd_redis_queue_set_lease_time (queue, 10 * G_USEC_PER_SEC);
  return queue;
}

/* Runs every job of @queue in this process: @n keyed jobs, each key's in
 * order. */
static void
consume_all (KdRedisQueue *queue,
             guint         n)
{
  Seen seen;

  seen_init (&seen);
  run_until_done (queue, 2, &seen);
  g_assert_cmpuint (seen.keyed, ==, n);
  g_assert_false (seen.out_of_order);
  seen_clear (&seen);
}

static void
assert_denied_without_password (GError *error)
{
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED);
  g_assert_null (strstr (error->message, PASSWORD));
  g_assert_null (strstr (error->message, "wrong-password"));
}

static void
test_parse_url (void)
{
  static const struct
  {
    const char *url;
    const char *host;
    guint       port;
    const char *socket_path;
    const char *user;
    const char *password;
    guint       db;
  } good[] = {
    { "redis://10.0.0.5", "10.0.0.5", 6379, NULL, NULL, NULL, 0 },
    { "redis://redis.example:6380/2", "redis.example", 6380, NULL, NULL, NULL, 2 },
    { "redis://:" PASSWORD_IN_URL "@h", "h", 6379, NULL, NULL, PASSWORD, 0 },
    { "redis://pw@h:1", "h", 1, NULL, NULL, "pw", 0 },
    { "redis://worker:pw@h/", "h", 6379, NULL, "worker", "pw", 0 },
    { "redis://[::1]:7000?db=5", "::1", 7000, NULL, NULL, NULL, 5 },
    { "REDIS://h", "h", 6379, NULL, NULL, NULL, 0 },
    { "unix:///run/redis/redis.sock", NULL, 0, "/run/redis/redis.sock", NULL, NULL, 0 },
    { "unix://u:p@/tmp/r.sock?db=3", NULL, 0, "/tmp/r.sock", "u", "p", 3 },
  };
  static const struct
  {
    const char *url;
    gint        code;
  } bad[] = {
    { "http://h", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://h/x", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://h/1?db=-2", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://:secret@h:99999", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://h/99999999999", G_IO_ERROR_INVALID_ARGUMENT },
    { "unix://relative.sock", G_IO_ERROR_INVALID_ARGUMENT },
    { "not a url", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://secret/secret@h", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://u:secret?db=secret@h", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://h/1?db=2", G_IO_ERROR_INVALID_ARGUMENT },
    { "redis://h:0", G_IO_ERROR_INVALID_ARGUMENT },
    { "unix://host/tmp/r.sock", G_IO_ERROR_INVALID_ARGUMENT },
  };
  guint i;

  g_test_summary ("Redis URLs as clients give them: TCP with user, password (percent-encoded), "
                  "port and database, IPv6, Unix sockets; a bad URL is refused with a clear "
                  "error that never quotes the password, and changes nothing");

  for (i = 0; i < G_N_ELEMENTS (good); i++)
    {
      KdRedisServer server;
      g_autoptr (GError) error = NULL;

      kd_redis_server_init (&server);
      g_assert_true (kd_redis_server_parse_url (&server, good[i].url, &error));
      g_assert_no_error (error);
      g_assert_cmpstr (server.host, ==, good[i].host);
      if (good[i].host != NULL)
        g_assert_cmpuint (server.port, ==, good[i].port);
      g_assert_cmpstr (server.socket_path, ==, good[i].socket_path);
      g_assert_cmpstr (server.user, ==, good[i].user);
      g_assert_cmpstr (server.password, ==, good[i].password);
      g_assert_cmpuint (server.db, ==, good[i].db);
      kd_redis_server_clear (&server);
    }

  for (i = 0; i < G_N_ELEMENTS (bad); i++)
    {
      KdRedisServer server;
      g_autoptr (GError) error = NULL;

      kd_redis_server_init (&server);
      g_assert_false (kd_redis_server_parse_url (&server, bad[i].url, &error));
      g_assert_error (error, G_IO_ERROR, bad[i].code);
      g_assert_null (strstr (error->message, "secret"));
      g_assert_cmpstr (server.host, ==, "127.0.0.1");
      g_assert_cmpuint (server.port, ==, 6379);
      kd_redis_server_clear (&server);
    }
}

static void
test_password (void)
{
  const char *extra[] = { "--requirepass", PASSWORD, NULL };
  Server server = { .extra_args = extra, .fsync_always = TRUE };
  g_autoptr (KdRedisQueue) anonymous = new_queue ("q");
  g_autoptr (KdRedisQueue) wrong = new_queue ("q");
  g_autoptr (KdRedisQueue) producer = new_queue ("q");
  g_autoptr (KdRedisQueue) worker = new_queue ("q");
  g_autoptr (GError) error = NULL;
  g_autofree char *url = NULL;

  g_test_summary ("With requirepass, a queue without the password is refused with "
                  "PERMISSION_DENIED, and so is a wrong one, never quoting it; with the "
                  "password in the URL (percent-encoded) or set apart, every connection "
                  "logs in, again after Redis restarts: the jobs are added, run in per-key "
                  "order and acknowledged");
  if (!need_redis ())
    return;

  server_start (&server);
  url = g_strdup_printf ("redis://:%s@127.0.0.1:%u", PASSWORD_IN_URL, server.port);

  kd_redis_queue_set_address (anonymous, "127.0.0.1", server.port);
  g_assert_false (add_jobs (anonymous, 1, &error));
  assert_denied_without_password (error);
  g_clear_error (&error);

  g_assert_true (kd_redis_queue_set_url (wrong, url, &error));
  kd_redis_queue_set_credentials (wrong, NULL, "wrong-password");
  g_assert_false (add_jobs (wrong, 1, &error));
  assert_denied_without_password (error);
  g_clear_error (&error);

  g_assert_true (kd_redis_queue_set_url (producer, url, &error));
  g_assert_true (add_jobs (producer, 300, &error));
  g_assert_no_error (error);

  /* The producer's connection breaks, and logs in again as it reconnects
   * (the first add after the restart may find the old connection gone). */
  server_kill (&server);
  server_launch (&server);
  if (!add_range (producer, 300, 1, &error))
    {
      g_assert_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED);
      g_clear_error (&error);
      g_assert_true (add_range (producer, 300, 1, &error));
    }
  g_assert_true (add_range (producer, 301, 9, &error));
  g_assert_no_error (error);

  kd_redis_queue_set_address (worker, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (worker, NULL, PASSWORD);
  consume_all (worker, 310);

  server_stop (&server);
}

static void
test_auth_unknown (void)
{
  const char *extra[] = { "--rename-command", "AUTH", "", NULL };
  Server server = { .extra_args = extra };
  g_autoptr (KdRedisQueue) queue = new_queue ("q");
  g_autoptr (GError) error = NULL;

  g_test_summary ("A server that does not know AUTH (renamed, or a proxy) echoes its "
                  "arguments in its error: the queue's error gives its code only, never "
                  "the password");
  if (!need_redis ())
    return;

  server_start (&server);
  kd_redis_queue_set_address (queue, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (queue, "someone", PASSWORD);
  g_assert_false (add_jobs (queue, 1, &error));
  assert_denied_without_password (error);
  g_assert_nonnull (strstr (error->message, "(ERR)"));
  server_stop (&server);
}

static void
test_unix_socket_db (void)
{
  g_autofree char *dir = g_dir_make_tmp ("kd-redis-sock-XXXXXX", NULL);
  g_autofree char *socket_path = g_build_filename (dir, "redis.sock", NULL);
  const char *extra[] = { "--unixsocket", socket_path, "--unixsocketperm", "700",
                          "--requirepass", PASSWORD, NULL };
  Server server = { .extra_args = extra };
  g_autoptr (KdRedisQueue) queue = new_queue ("q");
  g_autoptr (GError) error = NULL;
  g_autofree char *url = NULL;
  struct timeval tv = { 5, 0 };
  redisContext *c;
  redisReply *reply;

  g_test_summary ("unix:// with a password and ?db=3: the queue logs in over the socket and "
                  "keeps its keys in database 3, none in database 0");
  if (!need_redis ())
    return;

  server_start (&server);
  url = g_strdup_printf ("unix://:%s@%s?db=3", PASSWORD_IN_URL, socket_path);
  g_assert_true (kd_redis_queue_set_url (queue, url, &error));
  g_assert_no_error (error);
  g_assert_true (add_jobs (queue, 50, &error));
  g_assert_no_error (error);

  c = redisConnectUnixWithTimeout (socket_path, tv);
  g_assert_nonnull (c);
  g_assert_cmpint (c->err, ==, 0);
  reply = redisCommand (c, "AUTH %s", PASSWORD);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_STATUS);
  freeReplyObject (reply);
  reply = redisCommand (c, "DBSIZE");
  g_assert_cmpint (reply->integer, ==, 0);
  freeReplyObject (reply);
  reply = redisCommand (c, "SELECT 3");
  freeReplyObject (reply);
  reply = redisCommand (c, "DBSIZE");
  g_assert_cmpint (reply->integer, >, 0);
  freeReplyObject (reply);
  redisFree (c);

  consume_all (queue, 50);
  server_stop (&server);
  g_unlink (socket_path);
  g_rmdir (dir);
}

static void
test_acl (void)
{
  const char *worker_rules[] = { WORKER_COMMANDS };
  const char *producer_rules[] = { PRODUCER_COMMANDS };
  g_autoptr (GPtrArray) args = g_ptr_array_new_with_free_func (g_free);
  Server server = { 0 };
  g_autoptr (KdRedisQueue) producer = new_queue ("q");
  g_autoptr (KdRedisQueue) worker = new_queue ("q");
  g_autoptr (KdRedisQueue) stranger = new_queue ("q");
  g_autoptr (KdRedisQueue) other = new_queue ("other");
  g_autoptr (GError) error = NULL;
  guint64 backlog, trimmed;
  guint i;

  g_test_summary ("ACL users with exactly the rules the README lists, on the keys and "
                  "channels of their queue: the producer adds, the worker runs every job "
                  "in order; an unknown user is refused, and neither may touch another "
                  "queue's keys");
  if (!need_redis ())
    return;

  g_ptr_array_add (args, g_strdup ("--user"));
  g_ptr_array_add (args, g_strdup ("default"));
  g_ptr_array_add (args, g_strdup ("off"));
  g_ptr_array_add (args, g_strdup ("--user"));
  g_ptr_array_add (args, g_strdup ("kd-producer"));
  g_ptr_array_add (args, g_strdup ("on"));
  g_ptr_array_add (args, g_strdup (">producer-pw"));
  g_ptr_array_add (args, g_strdup ("resetkeys"));
  g_ptr_array_add (args, g_strdup ("~q:*"));
  g_ptr_array_add (args, g_strdup ("resetchannels"));
  g_ptr_array_add (args, g_strdup ("&q:*"));
  g_ptr_array_add (args, g_strdup ("-@all"));
  for (i = 0; i < G_N_ELEMENTS (producer_rules); i++)
    g_ptr_array_add (args, g_strdup (producer_rules[i]));
  g_ptr_array_add (args, g_strdup ("--user"));
  g_ptr_array_add (args, g_strdup ("kd-worker"));
  g_ptr_array_add (args, g_strdup ("on"));
  g_ptr_array_add (args, g_strdup (">worker-pw"));
  g_ptr_array_add (args, g_strdup ("resetkeys"));
  g_ptr_array_add (args, g_strdup ("~q:*"));
  g_ptr_array_add (args, g_strdup ("resetchannels"));
  g_ptr_array_add (args, g_strdup ("&q:*"));
  g_ptr_array_add (args, g_strdup ("-@all"));
  for (i = 0; i < G_N_ELEMENTS (worker_rules); i++)
    g_ptr_array_add (args, g_strdup (worker_rules[i]));
  g_ptr_array_add (args, NULL);
  server.extra_args = (const char * const *) args->pdata;
  server_start (&server);

  kd_redis_queue_set_address (producer, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (producer, "kd-producer", "producer-pw");
  g_assert_true (add_jobs (producer, 300, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_get_backlog (producer, &backlog, &error));
  g_assert_no_error (error);
  g_assert_cmpuint (backlog, ==, 300);

  kd_redis_queue_set_address (stranger, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (stranger, "nobody", "producer-pw");
  g_assert_false (add_jobs (stranger, 1, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED);
  g_assert_nonnull (strstr (error->message, "nobody"));
  g_clear_error (&error);

  kd_redis_queue_set_address (other, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (other, "kd-producer", "producer-pw");
  g_assert_false (add_jobs (other, 1, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED);
  g_clear_error (&error);

  kd_redis_queue_set_address (worker, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (worker, "kd-worker", "worker-pw");
  consume_all (worker, 300);

  /* The producer follows the backlog down, woken by the workers, and
   * trims what they acknowledged. */
  g_assert_true (kd_redis_queue_wait_backlog (producer, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_trim (producer, &trimmed, &error));
  g_assert_no_error (error);
  /* (The workers' lease keepers may have trimmed some already.) */
  g_assert_cmpuint (trimmed, <=, 300);

  server_stop (&server);
}

static void
test_worker_process (void)
{
  const char *extra[] = { "--user", "default", "off", "--user", "kd-w", "on", ">" PASSWORD,
                          "~*", "&*", "+@all", NULL };
  Server server = { .extra_args = extra };
  g_autoptr (KdRedisQueue) producer = new_queue ("q");
  g_autoptr (GError) error = NULL;
  g_autofree char *bare_url = NULL, *user_url = NULL, *file = NULL, *file_arg = NULL;
  Worker *from_env, *from_file;

  g_test_summary ("redis-worker logs in with --url and the password from REDISCLI_AUTH or "
                  "--password-file, never from its command line, and the user from --user "
                  "or from the URL (whose password the file's replaces): two such workers, "
                  "as an ACL user, run every job");
  if (!need_redis ())
    return;

  server_start (&server);
  bare_url = g_strdup_printf ("--url=redis://127.0.0.1:%u", server.port);
  user_url = g_strdup_printf ("--url=redis://kd-w:not-this@127.0.0.1:%u", server.port);
  file = g_build_filename (server.dir, "password", NULL);
  g_assert_true (g_file_set_contents (file, PASSWORD "\n", -1, NULL));
  file_arg = g_strdup_printf ("--password-file=%s", file);

  g_setenv ("REDISCLI_AUTH", PASSWORD, TRUE);
  from_env = worker_start (&server, "q", 0, bare_url, "--user=kd-w", "--lease-ms=10000", NULL);
  g_unsetenv ("REDISCLI_AUTH");
  from_file = worker_start (&server, "q", 1, user_url, file_arg, "--lease-ms=10000", NULL);

  kd_redis_queue_set_address (producer, "127.0.0.1", server.port);
  kd_redis_queue_set_credentials (producer, "kd-w", PASSWORD);
  g_assert_true (add_jobs (producer, 2000, &error));
  g_assert_no_error (error);
  g_assert_true (kd_redis_queue_wait_backlog (producer, 0, KD_REDIS_TEST_DEADLINE_US, &error));
  g_assert_no_error (error);

  worker_finish (from_env, FALSE);
  worker_finish (from_file, FALSE);
  g_assert_cmpuint (stat_of (from_env->out, "ran") + stat_of (from_file->out, "ran"), >=, 2000);
  worker_free (from_env);
  worker_free (from_file);
  server_stop (&server);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);
  find_redis_server ();

  g_test_add_func ("/kd/redis-auth/parse-url", test_parse_url);
  g_test_add_func ("/kd/redis-auth/password", test_password);
  g_test_add_func ("/kd/redis-auth/auth-unknown", test_auth_unknown);
  g_test_add_func ("/kd/redis-auth/unix-socket-db", test_unix_socket_db);
  g_test_add_func ("/kd/redis-auth/acl", test_acl);
  g_test_add_func ("/kd/redis-auth/worker-process", test_worker_process);

  return g_test_run ();
}
