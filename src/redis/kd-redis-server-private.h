/* kd-redis-server-private.h: where a Redis server is, and how to log in to it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <gio/gio.h>

G_BEGIN_DECLS

typedef struct
{
  char  *host;         /* TCP: a host name or address; NULL with @socket_path */
  guint  port;
  char  *socket_path;  /* a Unix socket, or NULL */
  char  *user;         /* an ACL user, or NULL: AUTH with the password alone */
  char  *password;     /* NULL: no AUTH */
  guint  db;           /* SELECTed on every connection when not 0 */
  gboolean cluster;    /* a node of a Redis Cluster, the seed of its map */
  gboolean         tls;              /* rediss://, or kd_redis_queue_set_tls() */
  gboolean         tls_set;          /* kd_redis_queue_set_tls() was called: TLS for good */
  GTlsDatabase    *tls_database;     /* the CAs trusted, or NULL: the system's */
  GTlsCertificate *tls_certificate;  /* the client's, with its key, or NULL */
} KdRedisServer;

void     kd_redis_server_init      (KdRedisServer       *server);
void     kd_redis_server_copy      (KdRedisServer       *dest,
                                    const KdRedisServer *src);
void     kd_redis_server_clear     (KdRedisServer       *server);
gboolean kd_redis_server_parse_url (KdRedisServer       *server,
                                    const char          *url,
                                    GError             **error);
char    *kd_redis_server_describe  (const KdRedisServer *server);
gboolean kd_redis_server_set_tls   (KdRedisServer       *server,
                                    const char          *ca_file,
                                    const char          *cert_file,
                                    const char          *key_file,
                                    GError             **error);

G_END_DECLS
