/* kd-redis-server.c: where a Redis server is, and how to log in to it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A queue's KdRedisServer is what kd_redis_queue_set_url(),
 * kd_redis_queue_set_address() and kd_redis_queue_set_credentials() said;
 * every connection the queue opens (reader, acker, lease keeper, producer,
 * subscriber) copies it and logs in with it each time it connects
 * (kd-redis-conn.c). URLs are the forms Redis clients share:
 *
 *   redis://[[user][:password]@]host[:port][/db]
 *   rediss://[[user][:password]@]host[:port][/db]     (TLS)
 *   unix://[[user][:password]@]/path/to/redis.sock[?db=N]
 *   redis+cluster://[[user][:password]@]host[:port]   (a Redis Cluster)
 *   rediss+cluster://[[user][:password]@]host[:port]  (a Redis Cluster, TLS)
 *
 * parsed by GUri, so user and password may be percent-encoded and an IPv6
 * address goes in brackets. rediss:// turns TLS on, and so does
 * kd_redis_server_set_tls(), for good: a redis:// URL set after it does not
 * turn it off, so that a password never goes out in clear by a later
 * setting. The CAs and client certificate are loaded once, when they are
 * set, so that a bad file is the setter's error, and every connection
 * shares them. A password is never part of a
 * description, nor of an error message. A cluster's URL names one node,
 * any of them: the seed from which kd-redis-router.c learns the others;
 * every node is logged in to the same way.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-server-private.h"

void
kd_redis_server_init (KdRedisServer *server)
{
  memset (server, 0, sizeof *server);
  server->host = g_strdup ("127.0.0.1");
  server->port = 6379;
}

void
kd_redis_server_copy (KdRedisServer       *dest,
                      const KdRedisServer *src)
{
  dest->host = g_strdup (src->host);
  dest->port = src->port;
  dest->socket_path = g_strdup (src->socket_path);
  dest->user = g_strdup (src->user);
  dest->password = g_strdup (src->password);
  dest->db = src->db;
  dest->cluster = src->cluster;
  dest->tls = src->tls;
  dest->tls_set = src->tls_set;
  dest->tls_database = src->tls_database != NULL ? g_object_ref (src->tls_database) : NULL;
  dest->tls_certificate = src->tls_certificate != NULL ? g_object_ref (src->tls_certificate) : NULL;
}

void
kd_redis_server_clear (KdRedisServer *server)
{
  g_clear_pointer (&server->host, g_free);
  g_clear_pointer (&server->socket_path, g_free);
  g_clear_pointer (&server->user, g_free);
  if (server->password != NULL)
    memset (server->password, 0, strlen (server->password));
  g_clear_pointer (&server->password, g_free);
  g_clear_object (&server->tls_database);
  g_clear_object (&server->tls_certificate);
}

/* Whether GIO can make TLS connections: glib-networking is installed. */
static gboolean
check_tls_available (GError **error)
{
  if (g_tls_backend_supports_tls (g_tls_backend_get_default ()))
    return TRUE;
  g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                       "TLS is not available: GIO has no TLS backend (install glib-networking)");
  return FALSE;
}

/* A certificate from a file without its key would be presented, and the
 * handshake would fail. */
static gboolean
has_private_key (GTlsCertificate *certificate)
{
  g_autoptr (GByteArray) key = NULL;

  g_object_get (certificate, "private-key", &key, NULL);
  return key != NULL;
}

/* Turns TLS on, trusting the CAs of @ca_file (PEM) or the system's, and
 * presenting the client certificate of @cert_file with the key of
 * @key_file (or of @cert_file), if given. On failure (a file that cannot
 * be read or holds no certificate or key, no TLS backend) @server is
 * unchanged. */
gboolean
kd_redis_server_set_tls (KdRedisServer  *server,
                         const char     *ca_file,
                         const char     *cert_file,
                         const char     *key_file,
                         GError        **error)
{
  g_autoptr (GTlsDatabase) database = NULL;
  g_autoptr (GTlsCertificate) certificate = NULL;
  GError *local_error = NULL;

  if (!check_tls_available (error))
    return FALSE;
  if (ca_file != NULL)
    {
      database = g_tls_file_database_new (ca_file, &local_error);
      if (database == NULL)
        {
          g_set_error (error, local_error->domain, local_error->code,
                       "Cannot use the CA file %s: %s", ca_file, local_error->message);
          g_error_free (local_error);
          return FALSE;
        }
    }
  if (cert_file != NULL)
    {
      certificate = key_file != NULL ? g_tls_certificate_new_from_files (cert_file, key_file, &local_error)
                                     : g_tls_certificate_new_from_file (cert_file, &local_error);
      if (certificate != NULL && !has_private_key (certificate))
        {
          g_set_error_literal (&local_error, G_TLS_ERROR, G_TLS_ERROR_BAD_CERTIFICATE,
                               "no private key (give the key's file)");
          g_clear_object (&certificate);
        }
      if (certificate == NULL)
        {
          g_set_error (error, local_error->domain, local_error->code,
                       "Cannot use the client certificate %s%s%s: %s", cert_file,
                       key_file != NULL ? " with the key " : "", key_file != NULL ? key_file : "",
                       local_error->message);
          g_error_free (local_error);
          return FALSE;
        }
    }

  server->tls = TRUE;
  server->tls_set = TRUE;
  g_clear_object (&server->tls_database);
  server->tls_database = g_steal_pointer (&database);
  g_clear_object (&server->tls_certificate);
  server->tls_certificate = g_steal_pointer (&certificate);
  return TRUE;
}

/* A database number: digits only, below 2^31. The text is not quoted in
 * the error: a password with an unencoded '/' or '?' ends up here. */
static gboolean
parse_db (const char  *text,
          guint       *db,
          const char  *url_part,
          GError     **error)
{
  guint64 value;

  if (!g_ascii_string_to_unsigned (text, 10, 0, G_MAXINT32, &value, NULL))
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                   "The Redis URL's %s is not a database number (a password with '/', '?' "
                   "or '@' must be percent-encoded)", url_part);
      return FALSE;
    }
  *db = (guint) value;
  return TRUE;
}

/* The db=N of a query, if any. */
static gboolean
parse_query (const char  *query,
             guint       *db,
             GError     **error)
{
  g_autoptr (GHashTable) params = NULL;
  GError *local_error = NULL;
  const char *value;

  if (query == NULL)
    return TRUE;
  params = g_uri_parse_params (query, -1, "&", G_URI_PARAMS_NONE, &local_error);
  if (params == NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                   "The Redis URL's query is not valid: %s", local_error->message);
      g_error_free (local_error);
      return FALSE;
    }
  value = g_hash_table_lookup (params, "db");
  if (value == NULL)
    return TRUE;
  if (*db != 0)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                           "The Redis URL names its database twice");
      return FALSE;
    }
  return parse_db (value, db, "query", error);
}

/* Fills @server from @url, replacing what it held but its CAs and client
 * certificate, or leaves it untouched and fails with
 * G_IO_ERROR_INVALID_ARGUMENT (or G_IO_ERROR_NOT_SUPPORTED for rediss://
 * without a TLS backend). */
gboolean
kd_redis_server_parse_url (KdRedisServer  *server,
                           const char     *url,
                           GError        **error)
{
  g_autoptr (GUri) uri = NULL;
  KdRedisServer parsed = { 0 };
  GError *local_error = NULL;
  const char *scheme, *path;

  uri = g_uri_parse (url, G_URI_FLAGS_HAS_PASSWORD, &local_error);
  if (uri == NULL)
    {
      /* GLib's message quotes the URL, password included. */
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                   "Not a valid Redis URL (%s)",
                   local_error->domain == G_URI_ERROR && local_error->code == G_URI_ERROR_BAD_PORT
                     ? "bad port" : "see redis://[[user][:password]@]host[:port][/db]");
      g_error_free (local_error);
      return FALSE;
    }

  scheme = g_uri_get_scheme (uri);
  path = g_uri_get_path (uri);
  parsed.user = g_strdup (g_uri_get_user (uri));
  parsed.password = g_strdup (g_uri_get_password (uri));
  /* "redis://user@host": a user alone is a password, as redis-cli reads it. */
  if (parsed.password == NULL && parsed.user != NULL)
    {
      parsed.password = g_steal_pointer (&parsed.user);
    }
  if (parsed.user != NULL && parsed.user[0] == '\0')
    g_clear_pointer (&parsed.user, g_free);

  parsed.cluster = g_ascii_strcasecmp (scheme, "redis+cluster") == 0 ||
                   g_ascii_strcasecmp (scheme, "rediss+cluster") == 0;
  if (g_ascii_strcasecmp (scheme, "redis") == 0 || g_ascii_strcasecmp (scheme, "rediss") == 0 ||
      parsed.cluster)
    {
      parsed.tls = g_ascii_strncasecmp (scheme, "rediss", 6) == 0 || server->tls_set;
      if (parsed.tls && !check_tls_available (error))
        goto fail;
      if (g_uri_get_host (uri) == NULL || g_uri_get_host (uri)[0] == '\0')
        {
          g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                               "The Redis URL has no host");
          goto fail;
        }
      if (g_uri_get_port (uri) == 0)
        {
          g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                               "The Redis URL's port is 0");
          goto fail;
        }
      parsed.host = g_strdup (g_uri_get_host (uri));
      parsed.port = g_uri_get_port (uri) > 0 ? (guint) g_uri_get_port (uri) : 6379;
      if (path[0] == '/')
        path++;
      if (path[0] != '\0' && !parse_db (path, &parsed.db, "path", error))
        goto fail;
    }
  else if (g_ascii_strcasecmp (scheme, "unix") == 0)
    {
      if (g_uri_get_host (uri) != NULL && g_uri_get_host (uri)[0] != '\0')
        {
          g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                               "A unix:// Redis URL takes no host (unix:///path/to/redis.sock)");
          goto fail;
        }
      if (path[0] != '/')
        {
          g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                               "A unix:// Redis URL needs an absolute socket path "
                               "(unix:///path/to/redis.sock)");
          goto fail;
        }
      parsed.socket_path = g_strdup (path);
    }
  else
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                   "Not a Redis URL: scheme \"%s\" (redis://, rediss://, unix://, "
                   "redis+cluster:// or rediss+cluster://)", scheme);
      goto fail;
    }
  if (!parse_query (g_uri_get_query (uri), &parsed.db, error))
    goto fail;
  if (parsed.cluster && parsed.db != 0)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_INVALID_ARGUMENT,
                           "A Redis Cluster has only database 0");
      goto fail;
    }

  /* The URL replaces where and how to log in; TLS set by
   * kd_redis_server_set_tls() stays on, with its CAs and client
   * certificate: a redis:// URL never turns it off. */
  parsed.tls_set = server->tls_set;
  parsed.tls = parsed.tls || server->tls_set;
  parsed.tls_database = g_steal_pointer (&server->tls_database);
  parsed.tls_certificate = g_steal_pointer (&server->tls_certificate);
  kd_redis_server_clear (server);
  *server = parsed;
  return TRUE;

fail:
  kd_redis_server_clear (&parsed);
  return FALSE;
}

/* "host:port", "[v6]:port" or the socket's path, and the database if not
 * 0; never the credentials. Free with g_free(). */
char *
kd_redis_server_describe (const KdRedisServer *server)
{
  GString *out = g_string_new (NULL);

  if (server->socket_path != NULL)
    g_string_append (out, server->socket_path);
  else if (strchr (server->host, ':') != NULL)
    g_string_append_printf (out, "[%s]:%u", server->host, server->port);
  else
    g_string_append_printf (out, "%s:%u", server->host, server->port);
  if (server->db != 0)
    g_string_append_printf (out, " db %u", server->db);
  return g_string_free (out, FALSE);
}
