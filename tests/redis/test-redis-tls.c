/* test-redis-tls.c: a queue over TLS, its certificates checked
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each case starts a redis-server with a TLS port and certificates openssl
 * makes for it (kd-redis-harness.c): a CA, the server's certificate for
 * 127.0.0.1 and localhost, a client's, and a second CA that signed none
 * of them. The server asks clients for their certificate.
 */

#include "config.h"

#include <kdispatch/kdispatch.h>
#include <string.h>

#include "kd-redis-harness.h"
#include "kd-redis-server-private.h"
#include "kd-test-util.h"

#define PASSWORD "tls-pw"

/* A queue of 4 shards on @server's TLS port, as @url_host says it (a
 * rediss:// URL with the password), trusting @ca_file, with the client
 * certificate if @with_client_cert. */
static KdRedisQueue *
tls_queue (Server     *server,
           const char *url_host,
           const char *ca_file,
           gboolean    with_client_cert)
{
  KdRedisQueue *queue = kd_redis_queue_new ("q");
  g_autofree char *url = g_strdup_printf ("rediss://:" PASSWORD "@%s:%u", url_host, server->tls_port);
  g_autoptr (GError) error = NULL;

  kd_redis_queue_set_n_shards (queue, 4);
  kd_redis_queue_set_lease_time (queue, 10 * G_USEC_PER_SEC);
  g_assert_true (kd_redis_queue_set_url (queue, url, &error));
  g_assert_no_error (error);
  if (ca_file != NULL || with_client_cert)
    g_assert_true (kd_redis_queue_set_tls (queue, ca_file,
                                           with_client_cert ? server->tls_files.client_cert : NULL,
                                           with_client_cert ? server->tls_files.client_key : NULL,
                                           &error));
  g_assert_no_error (error);
  return queue;
}

static gboolean
add_one (KdRedisQueue  *queue,
         GError       **error)
{
  g_autoptr (GBytes) payload = g_bytes_new_static ("1", 1);

  return kd_redis_queue_add (queue, "key", payload, error);
}

/* The queue's calls, adding and consuming, fail with @domain and @code
 * and a message that says @reason. */
static void
assert_refused (KdRedisQueue *queue,
                GQuark        domain,
                gint          code,
                const char   *reason)
{
  g_autoptr (KdDispatcher) dispatcher = NULL;
  g_autoptr (GError) error = NULL;

  g_assert_false (add_one (queue, &error));
  g_assert_error (error, domain, code);
  g_test_message ("add: %s", error->message);
  g_assert_nonnull (strstr (error->message, reason));
  g_assert_null (strstr (error->message, PASSWORD));
  g_clear_error (&error);

  dispatcher = kd_redis_queue_new_dispatcher (queue, 1, kd_test_noop_handler, NULL, NULL);
  g_assert_false (kd_redis_queue_start (queue, &error));
  g_assert_error (error, domain, code);
  g_assert_nonnull (strstr (error->message, reason));
}

static void
test_url (void)
{
  KdRedisServer server;
  g_autoptr (GError) error = NULL;

  g_test_summary ("rediss:// is TLS with what a redis:// URL carries; after the CA and client "
                  "certificate are set, TLS stays on with them, whatever URL comes next");
  if (!need_tls ())
    return;

  kd_redis_server_init (&server);
  g_assert_true (kd_redis_server_parse_url (&server, "rediss://u:p@h:6380/2", &error));
  g_assert_no_error (error);
  g_assert_true (server.tls);
  g_assert_cmpstr (server.host, ==, "h");
  g_assert_cmpuint (server.port, ==, 6380);
  g_assert_cmpstr (server.user, ==, "u");
  g_assert_cmpstr (server.password, ==, "p");
  g_assert_cmpuint (server.db, ==, 2);
  g_assert_null (server.tls_database);

  /* Files set, then a plain URL: TLS stays on, with the files. */
  {
    g_autofree char *dir = g_dir_make_tmp ("kd-tls-XXXXXX", &error);
    TlsFiles files = { 0 };

    g_assert_no_error (error);
    tls_files_make (&files, dir);
    g_assert_true (kd_redis_server_set_tls (&server, files.ca, files.client_cert, files.client_key, &error));
    g_assert_no_error (error);
    g_assert_true (kd_redis_server_parse_url (&server, "redis://h", &error));
    g_assert_true (server.tls);
    g_assert_nonnull (server.tls_database);
    g_assert_nonnull (server.tls_certificate);
    g_assert_true (kd_redis_server_parse_url (&server, "rediss://h", &error));
    g_assert_true (server.tls);
    g_assert_nonnull (server.tls_database);
    tls_files_clear (&files);
    remove_dir (dir);
  }
  kd_redis_server_clear (&server);
}

static void
test_round_trip (void)
{
  const char *extra[] = { "--requirepass", PASSWORD, NULL };
  Server server = { .tls = TRUE, .extra_args = extra };
  g_autoptr (KdRedisQueue) producer = NULL;
  g_autoptr (KdRedisQueue) worker = NULL;
  g_autoptr (GError) error = NULL;
  guint n = kd_test_size (2000, 10000), i;
  Seen seen;

  g_test_summary ("Over TLS with a client certificate and a password: jobs over 100 keys are "
                  "added, run once each in per-key order and acknowledged");
  if (!need_tls ())
    return;

  server_start (&server);
  producer = tls_queue (&server, "127.0.0.1", server.tls_files.ca, TRUE);
  worker = tls_queue (&server, "127.0.0.1", server.tls_files.ca, TRUE);
  for (i = 0; i < n; i++)
    {
      g_autofree char *key = g_strdup_printf ("key-%u", i % 100);
      g_autofree char *text = g_strdup_printf ("%u", i / 100 + 1);
      g_autoptr (GBytes) payload = g_bytes_new (text, strlen (text));

      g_assert_true (kd_redis_queue_add (producer, key, payload, &error));
      g_assert_no_error (error);
    }

  seen_init (&seen);
  run_until_done (worker, 2, &seen);
  g_assert_cmpuint (seen.keyed, ==, n);
  g_assert_false (seen.out_of_order);
  seen_clear (&seen);

  server_stop (&server);
}

typedef enum
{
  TRUST_TEST_CA,
  TRUST_OTHER_CA,
  TRUST_SYSTEM,
} Trust;

/* A queue that reaches a TLS server (started with @extra_args) as @host
 * and trusts @trust is refused, saying @reason. */
static void
check_certificate_refused (const char * const *extra_args,
                           const char         *host,
                           Trust               trust,
                           const char         *reason)
{
  Server server = { .tls = TRUE, .extra_args = extra_args };
  g_autoptr (KdRedisQueue) queue = NULL;

  server_start (&server);
  queue = tls_queue (&server, host,
                     trust == TRUST_TEST_CA ? server.tls_files.ca :
                     trust == TRUST_OTHER_CA ? server.tls_files.other_ca : NULL,
                     TRUE);
  assert_refused (queue, G_TLS_ERROR, G_TLS_ERROR_BAD_CERTIFICATE, reason);
  server_stop (&server);
}

static void
test_wrong_ca (void)
{
  g_test_summary ("A server certificate signed by a CA the queue does not trust is refused with "
                  "G_TLS_ERROR_BAD_CERTIFICATE, saying so, when adding and when consuming");
  if (need_tls ())
    check_certificate_refused (NULL, "127.0.0.1", TRUST_OTHER_CA,
                               "not signed by a trusted certificate authority");
}

static void
test_system_store (void)
{
  g_test_summary ("Without a CA file, the system's certificate authorities are the ones trusted: "
                  "the test's own CA is not among them");
  if (need_tls ())
    check_certificate_refused (NULL, "127.0.0.1", TRUST_SYSTEM,
                               "not signed by a trusted certificate authority");
}

static void
test_wrong_host (void)
{
  static const char *extra[] = { "--bind", "127.0.0.1", "127.0.0.2", NULL };

  g_test_summary ("A trusted certificate for another host (127.0.0.1, reached as 127.0.0.2) is "
                  "refused, saying so");
  if (need_tls ())
    check_certificate_refused (extra, "127.0.0.2", TRUST_TEST_CA, "not for this host");
}

static void
test_no_client_certificate (void)
{
  Server server = { .tls = TRUE };
  g_autoptr (KdRedisQueue) queue = NULL;
  g_autoptr (GError) error = NULL;

  g_test_summary ("A server that asks for a client certificate refuses a queue without one: "
                  "its calls fail with a G_TLS_ERROR that says so, they do not hang");
  if (!need_tls ())
    return;

  server_start (&server);
  queue = tls_queue (&server, "127.0.0.1", server.tls_files.ca, FALSE);
  g_assert_false (add_one (queue, &error));
  g_assert_nonnull (error);
  g_test_message ("%s (%s %d)", error->message, g_quark_to_string (error->domain), error->code);
  g_assert_true (error->domain == G_TLS_ERROR);
  g_assert_nonnull (strstr (error->message, "127.0.0.1"));
  g_assert_nonnull (strstr (error->message, "ertificate"));
  server_stop (&server);
}

static void
test_bad_files (void)
{
  g_autoptr (KdRedisQueue) queue = kd_redis_queue_new ("q");
  g_autoptr (GError) error = NULL;
  g_autofree char *dir = NULL;
  g_autofree char *missing = NULL;
  TlsFiles files = { 0 };
  Server server = { 0 };

  g_test_summary ("A CA file or client certificate that cannot be used is kd_redis_queue_set_tls()'s "
                  "error, naming the file, and the queue stays as it was (plain here); once the "
                  "queue is in use, TLS cannot be set");
  if (!need_tls ())
    return;

  dir = g_dir_make_tmp ("kd-tls-XXXXXX", &error);
  g_assert_no_error (error);
  tls_files_make (&files, dir);
  missing = g_build_filename (dir, "missing.crt", NULL);

  g_assert_false (kd_redis_queue_set_tls (queue, missing, NULL, NULL, &error));
  g_assert_nonnull (error);
  g_assert_nonnull (strstr (error->message, missing));
  g_clear_error (&error);
  /* A certificate without its key (the key in neither file). */
  g_assert_false (kd_redis_queue_set_tls (queue, files.ca, files.client_cert, NULL, &error));
  g_assert_nonnull (error);
  g_assert_nonnull (strstr (error->message, files.client_cert));
  g_clear_error (&error);

  server_start (&server);
  kd_redis_queue_set_address (queue, "127.0.0.1", server.port);
  kd_redis_queue_set_n_shards (queue, 4);
  g_assert_true (add_one (queue, &error));
  g_assert_no_error (error);
  g_assert_false (kd_redis_queue_set_tls (queue, files.ca, NULL, NULL, &error));
  g_assert_error (error, G_IO_ERROR, G_IO_ERROR_BUSY);

  server_stop (&server);
  tls_files_clear (&files);
  remove_dir (dir);
}

int
main (int   argc,
      char *argv[])
{
  g_test_init (&argc, &argv, NULL);

  find_redis_server ();
  g_test_add_func ("/kd/redis-tls/url", test_url);
  g_test_add_func ("/kd/redis-tls/round-trip", test_round_trip);
  g_test_add_func ("/kd/redis-tls/wrong-ca", test_wrong_ca);
  g_test_add_func ("/kd/redis-tls/system-store", test_system_store);
  g_test_add_func ("/kd/redis-tls/wrong-host", test_wrong_host);
  g_test_add_func ("/kd/redis-tls/no-client-certificate", test_no_client_certificate);
  g_test_add_func ("/kd/redis-tls/bad-files", test_bad_files);

  return g_test_run ();
}
