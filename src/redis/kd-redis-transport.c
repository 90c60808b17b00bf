/* kd-redis-transport.c: the bytes to and from one Redis server, over TCP, a Unix socket or TLS
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A connection (kd-redis-conn.c) formats its commands and parses its
 * replies with hiredis; the bytes go through a transport made of GIO
 * streams: a GSocketConnection, with a GTlsClientConnection over it for
 * TLS. Debian 12's hiredis (0.14) has no TLS, and GIO's, with
 * glib-networking, verifies the server's certificate against the system's
 * store or a CA file, presents a client certificate, reports why a
 * certificate was refused, and is the TLS every GLib application already
 * ships; linking OpenSSL for a second one would not do more. One path for
 * plain and encrypted connections keeps their behaviour the same.
 *
 * Every read and write waits until a monotonic deadline at most: the
 * socket is non-blocking, the streams are read and written with the
 * pollable calls, and a call that would block waits on the socket's
 * condition for what is left of the time. (TLS decrypts what is buffered
 * before the socket is asked again, so waiting on the socket never misses
 * a reply.) The connect waits for the connection's timeout too, and so
 * does each read and write of the TLS handshake, which GIO makes on a
 * thread of its own and times in whole seconds.
 *
 * GSocket sends with MSG_NOSIGNAL, so a write to a connection Redis closed
 * fails with EPIPE and raises no SIGPIPE, whatever the application does
 * with that signal.
 */

#include "config.h"

#include <netinet/in.h>
#include <netinet/tcp.h>

#include "kd-redis-transport-private.h"

struct _KdRedisTransport
{
  GIOStream    *stream;      /* the connection, or TLS over it */
  GSocket      *socket;      /* what the streams read and write */
  const char   *where;       /* the server, for messages */
};

/* hiredis's keepalive interval (REDIS_KEEPALIVE_INTERVAL). */
#define KEEPALIVE_IDLE_S 15

/* The longest single wait on a socket: GLib hands poll() milliseconds as
 * an int, which a wait of 25 days would overflow. */
#define MAX_WAIT_US ((gint64) 3600 * G_USEC_PER_SEC)

/* Waits until @socket is ready for @condition or @deadline (monotonic,
 * or -1: none) passed. */
static gboolean
wait_for (GSocket       *socket,
          GIOCondition   condition,
          gint64         deadline,
          GError       **error)
{
  for (;;)
    {
      gint64 left = deadline < 0 ? MAX_WAIT_US : deadline - g_get_monotonic_time ();
      GError *local_error = NULL;

      if (left <= 0)
        {
          g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT, "timed out");
          return FALSE;
        }
      /* Whole milliseconds, rounded up (poll()'s unit): never back before
       * the deadline. */
      left = MIN ((left + 999) / 1000 * 1000, MAX_WAIT_US);
      if (g_socket_condition_timed_wait (socket, condition, left, NULL, &local_error))
        return TRUE;
      if (!g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT))
        {
          g_propagate_error (error, local_error);
          return FALSE;
        }
      g_error_free (local_error);
    }
}

/* Connects @socket, made non-blocking, to @address within @deadline. */
static gboolean
connect_within (GSocket         *socket,
                GSocketAddress  *address,
                gint64           deadline,
                GError         **error)
{
  GError *local_error = NULL;

  g_socket_set_blocking (socket, FALSE);
  if (g_socket_connect (socket, address, NULL, &local_error))
    return TRUE;
  if (!g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_PENDING))
    {
      g_propagate_error (error, local_error);
      return FALSE;
    }
  g_error_free (local_error);
  return wait_for (socket, G_IO_OUT, deadline, error) && g_socket_check_connect_result (socket, error);
}

/* A socket connected to one of @connectable's addresses, in turn, each
 * within @deadline; the last address's error if none answers. */
static GSocket *
connect_socket (GSocketConnectable  *connectable,
                gint64               deadline,
                GError             **error)
{
  g_autoptr (GSocketAddressEnumerator) addresses = g_socket_connectable_enumerate (connectable);
  GError *last_error = NULL;

  for (;;)
    {
      g_autoptr (GSocketAddress) address = NULL;
      g_autoptr (GSocket) socket = NULL;
      GError *local_error = NULL;

      address = g_socket_address_enumerator_next (addresses, NULL, &local_error);
      if (address == NULL)
        {
          if (local_error == NULL && last_error == NULL)
            g_set_error_literal (&local_error, G_IO_ERROR, G_IO_ERROR_NOT_FOUND,
                                 "no address to connect to");
          if (local_error != NULL)
            {
              g_clear_error (&last_error);
              last_error = local_error;
            }
          g_propagate_error (error, last_error);
          return NULL;
        }

      socket = g_socket_new (g_socket_address_get_family (address), G_SOCKET_TYPE_STREAM,
                             G_SOCKET_PROTOCOL_DEFAULT, &local_error);
      if (socket != NULL && connect_within (socket, address, deadline, &local_error))
        {
          g_clear_error (&last_error);
          return g_steal_pointer (&socket);
        }
      g_clear_error (&last_error);
      last_error = local_error;
    }
}

/* Why a certificate was refused, from its flags. */
static const char *
certificate_problem (GTlsCertificateFlags flags)
{
  if (flags & G_TLS_CERTIFICATE_UNKNOWN_CA)
    return "it is not signed by a trusted certificate authority";
  if (flags & G_TLS_CERTIFICATE_BAD_IDENTITY)
    return "it is not for this host";
  if (flags & G_TLS_CERTIFICATE_NOT_ACTIVATED)
    return "it is not valid yet";
  if (flags & G_TLS_CERTIFICATE_EXPIRED)
    return "it has expired";
  if (flags & G_TLS_CERTIFICATE_REVOKED)
    return "it was revoked";
  if (flags & G_TLS_CERTIFICATE_INSECURE)
    return "its algorithm is insecure";
  return "it could not be verified";
}

/* Refuses every certificate GIO did not accept, noting why. */
static gboolean
refuse_certificate (GTlsConnection       *connection,
                    GTlsCertificate      *peer,
                    GTlsCertificateFlags  errors,
                    gpointer              user_data)
{
  GTlsCertificateFlags *refused = user_data;

  *refused = errors;
  return FALSE;
}

/* TLS over @base, verified against @server's CAs (the system's if none),
 * with its client certificate if it has one. */
static GIOStream *
start_tls (GIOStream            *base,
           GSocket              *socket,
           const KdRedisServer  *server,
           const char           *where,
           gint64                timeout_us,
           GError              **error)
{
  g_autoptr (GSocketConnectable) identity = NULL;
  g_autoptr (GIOStream) tls = NULL;
  GTlsCertificateFlags refused = 0;
  GError *local_error = NULL;
  gulong handler;
  gboolean ok;

  if (server->host != NULL)
    identity = g_network_address_new (server->host, (guint16) server->port);
  tls = g_tls_client_connection_new (base, identity, &local_error);
  if (tls == NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_SUPPORTED,
                   "Redis at %s: TLS is not available (it needs glib-networking): %s", where,
                   local_error->message);
      g_error_free (local_error);
      return NULL;
    }
  if (server->tls_database != NULL)
    g_tls_connection_set_database (G_TLS_CONNECTION (tls), server->tls_database);
  if (server->tls_certificate != NULL)
    g_tls_connection_set_certificate (G_TLS_CONNECTION (tls), server->tls_certificate);
  handler = g_signal_connect (tls, "accept-certificate", G_CALLBACK (refuse_certificate), &refused);

  g_socket_set_timeout (socket, (guint) MAX ((timeout_us + G_USEC_PER_SEC - 1) / G_USEC_PER_SEC, 1));
  ok = g_tls_connection_handshake (G_TLS_CONNECTION (tls), NULL, &local_error);
  g_socket_set_timeout (socket, 0);
  g_signal_handler_disconnect (tls, handler);

  if (!ok && refused != 0)
    {
      g_set_error (error, G_TLS_ERROR, G_TLS_ERROR_BAD_CERTIFICATE,
                   "Redis at %s: the server's TLS certificate is refused: %s", where,
                   certificate_problem (refused));
      g_error_free (local_error);
      return NULL;
    }
  if (!ok)
    {
      g_set_error (error, local_error->domain,
                   local_error->domain == G_TLS_ERROR ? local_error->code : G_IO_ERROR_CONNECTION_CLOSED,
                   "Redis at %s: TLS handshake failed: %s", where, local_error->message);
      g_error_free (local_error);
      return NULL;
    }
  return g_steal_pointer (&tls);
}

/*
 * kd_redis_transport_connect:
 *
 * Connects to @server (described as @where, which must outlive the
 * transport) within @timeout_us, and makes the TLS handshake if it says
 * so. Fails with G_IO_ERROR_CONNECTION_REFUSED (the socket's reason in the
 * message) or the handshake's error: G_TLS_ERROR_BAD_CERTIFICATE, saying
 * why, for a server certificate that is not trusted.
 */
KdRedisTransport *
kd_redis_transport_connect (const KdRedisServer  *server,
                            const char           *where,
                            gint64                timeout_us,
                            GError              **error)
{
  g_autoptr (GSocketConnectable) connectable = NULL;
  g_autoptr (GSocket) socket = NULL;
  g_autoptr (GIOStream) stream = NULL;
  GError *local_error = NULL;
  KdRedisTransport *self;

  if (server->socket_path != NULL)
    connectable = G_SOCKET_CONNECTABLE (g_unix_socket_address_new (server->socket_path));
  else
    connectable = g_network_address_new (server->host, (guint16) server->port);
  socket = connect_socket (connectable, g_get_monotonic_time () + timeout_us, &local_error);
  if (socket == NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_REFUSED,
                   "Cannot connect to Redis at %s: %s", where, local_error->message);
      g_error_free (local_error);
      return NULL;
    }
  /* As hiredis does: a command goes out at once, never held back for the
   * acknowledgement of the one before (Nagle), and a peer gone without a
   * word is found within about 30 s by keepalive probes (idle 15 s, then
   * every 5 s, 3 unanswered), not the system's two hours: a wait for the
   * backlog with no deadline reads with no timeout of its own. */
  if (server->socket_path == NULL)
    {
      g_socket_set_option (socket, IPPROTO_TCP, TCP_NODELAY, 1, NULL);
      g_socket_set_keepalive (socket, TRUE);
      g_socket_set_option (socket, IPPROTO_TCP, TCP_KEEPIDLE, KEEPALIVE_IDLE_S, NULL);
      g_socket_set_option (socket, IPPROTO_TCP, TCP_KEEPINTVL, KEEPALIVE_IDLE_S / 3, NULL);
      g_socket_set_option (socket, IPPROTO_TCP, TCP_KEEPCNT, 3, NULL);
    }

  stream = G_IO_STREAM (g_socket_connection_factory_create_connection (socket));
  if (server->tls)
    {
      GIOStream *tls = start_tls (stream, socket, server, where, timeout_us, error);

      if (tls == NULL)
        return NULL;
      g_object_unref (stream);
      stream = tls;
    }

  self = g_new0 (KdRedisTransport, 1);
  self->stream = g_steal_pointer (&stream);
  self->socket = g_steal_pointer (&socket);
  self->where = where;
  return self;
}

void
kd_redis_transport_free (KdRedisTransport *self)
{
  /* Closing the TLS stream would send close_notify, which may block on a
   * server that stopped reading: the socket is closed as it is. */
  g_socket_close (self->socket, NULL);
  g_object_unref (self->stream);
  g_object_unref (self->socket);
  g_free (self);
}

/* An I/O failure is G_IO_ERROR_CONNECTION_CLOSED, as for hiredis's own
 * I/O (a wait for a deadline of the caller's says TIMED_OUT itself), but
 * a TLS error (such as a server that refused the client's certificate,
 * which TLS 1.3 says only after the handshake) keeps its G_TLS_ERROR: it
 * lasts until an operator acts. */
static void
set_io_error (KdRedisTransport  *self,
              GError            *cause,
              GError           **error)
{
  if (cause->domain == G_TLS_ERROR)
    g_set_error (error, G_TLS_ERROR, cause->code, "Redis at %s: %s", self->where, cause->message);
  else
    g_set_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED, "Redis at %s: %s", self->where,
                 cause->message);
  g_error_free (cause);
}

/*
 * kd_redis_transport_write_all:
 *
 * Writes all of @data, or fails with G_IO_ERROR_CONNECTION_CLOSED (also
 * when the socket took nothing for @timeout_us) or a G_TLS_ERROR; what was
 * written is then unknown.
 */
gboolean
kd_redis_transport_write_all (KdRedisTransport  *self,
                              const guint8      *data,
                              gsize              len,
                              gint64             timeout_us,
                              GError           **error)
{
  GPollableOutputStream *out = G_POLLABLE_OUTPUT_STREAM (g_io_stream_get_output_stream (self->stream));
  gint64 deadline = g_get_monotonic_time () + timeout_us;

  while (len > 0)
    {
      GError *local_error = NULL;
      gssize n = g_pollable_output_stream_write_nonblocking (out, data, len, NULL, &local_error);

      if (n > 0)
        {
          data += n;
          len -= (gsize) n;
          deadline = g_get_monotonic_time () + timeout_us;
          continue;
        }
      if (!g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK))
        {
          set_io_error (self, local_error, error);
          return FALSE;
        }
      g_clear_error (&local_error);
      if (!wait_for (self->socket, G_IO_OUT, deadline, &local_error))
        {
          set_io_error (self, local_error, error);
          return FALSE;
        }
    }
  return TRUE;
}

/*
 * kd_redis_transport_read:
 *
 * Reads what arrived, at most @len bytes, waiting until @deadline (or -1:
 * for ever) for some; returns how many (at least 1), or 0 with
 * G_IO_ERROR_CONNECTION_CLOSED (Redis closed the connection, an I/O error,
 * or the deadline passed) or a G_TLS_ERROR.
 */
gsize
kd_redis_transport_read (KdRedisTransport  *self,
                         guint8            *buffer,
                         gsize              len,
                         gint64             deadline,
                         GError           **error)
{
  GPollableInputStream *in = G_POLLABLE_INPUT_STREAM (g_io_stream_get_input_stream (self->stream));

  for (;;)
    {
      GError *local_error = NULL;
      gssize n = g_pollable_input_stream_read_nonblocking (in, buffer, len, NULL, &local_error);

      if (n > 0)
        return (gsize) n;
      if (n == 0)
        {
          g_set_error (error, G_IO_ERROR, G_IO_ERROR_CONNECTION_CLOSED,
                       "Redis at %s: the server closed the connection", self->where);
          return 0;
        }
      if (!g_error_matches (local_error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK))
        {
          set_io_error (self, local_error, error);
          return 0;
        }
      g_clear_error (&local_error);
      if (!wait_for (self->socket, G_IO_IN, deadline, &local_error))
        {
          set_io_error (self, local_error, error);
          return 0;
        }
    }
}
