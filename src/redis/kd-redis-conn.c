/* kd-redis-conn.c: one blocking Redis connection with kdispatch's scripts
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * hiredis formats the commands and parses the replies; the bytes go
 * through a transport (kd-redis-transport.c: TCP, a Unix socket, TLS).
 * Appended commands wait in @out until a reply is read, so a pipeline is
 * one write. The steps of the protocol that must be atomic and carry few entries are
 * Lua scripts (kd-redis-scripts.c), loaded when the connection opens and
 * run with EVALSHA; the ones that carry many run in MULTI transactions
 * (kd_redis_conn_transaction()). A connection that fails (an I/O error, a
 * timeout, a server that lost its scripts after a restart, an error inside
 * a pipeline) is closed; the next kd_redis_conn_ensure() reconnects and
 * loads the scripts again. See kd-redis-queue.c for the design.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-conn-private.h"

/* What one read from the transport takes at most. */
#define READ_SIZE ((gsize) 64 * 1024)

struct _KdRedisLink
{
  KdRedisTransport *transport;
  redisReader      *reader;      /* the replies received */
  GByteArray       *out;         /* commands appended, not yet sent */
  guint8            in[READ_SIZE];
};

/* Replies in arenas. hiredis builds a reply as a tree of redisReply
 * objects, with an allocation for each object and each string: a read of
 * a few thousand entries makes tens of thousands of them, and freeing
 * them as many again, which was most of what a consumer spent per job.
 * Each connection's reader builds its replies instead in an arena per
 * reply, freed in one go by kd_redis_reply_free(). */

typedef struct _ArenaBlock ArenaBlock;

struct _ArenaBlock
{
  ArenaBlock *next;
  gsize       size;
  gsize       used;
  /* The data follows, aligned as malloc() aligns. */
};

typedef struct
{
  ArenaBlock *blocks;            /* the one being filled first */
  redisReply  reply;             /* the reply's root */
} ArenaReply;

#define ARENA_ALIGN (2 * sizeof (void *))
#define ARENA_HEADER ((sizeof (ArenaBlock) + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN)
#define ARENA_FIRST_BLOCK ((gsize) 1024)
#define ARENA_MAX_BLOCK ((gsize) 256 * 1024)

static gpointer
arena_alloc (ArenaReply *arena,
             gsize       size)
{
  ArenaBlock *block = arena->blocks;
  gpointer at;

  size = (size + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
  if (block == NULL || block->size - block->used < size)
    {
      gsize block_size = block != NULL ? MIN (block->size * 2, ARENA_MAX_BLOCK) : ARENA_FIRST_BLOCK;

      block_size = MAX (block_size, size);
      block = g_malloc (ARENA_HEADER + block_size);
      block->next = arena->blocks;
      block->size = block_size;
      block->used = 0;
      arena->blocks = block;
    }
  at = (char *) block + ARENA_HEADER + block->used;
  block->used += size;
  return at;
}

static ArenaReply *
arena_of (redisReply *root)
{
  return (ArenaReply *) (gpointer) ((char *) root - G_STRUCT_OFFSET (ArenaReply, reply));
}

/* A new object of @task's reply, linked to its parent; its reply's arena
 * in @arena. */
static redisReply *
arena_new_object (const redisReadTask  *task,
                  int                   type,
                  ArenaReply          **arena)
{
  const redisReadTask *root = task;
  redisReply *reply;

  if (task->parent == NULL)
    {
      *arena = g_new0 (ArenaReply, 1);
      reply = &(*arena)->reply;
    }
  else
    {
      /* A child is made once its parents are: the root's object is set. */
      while (root->parent != NULL)
        root = root->parent;
      *arena = arena_of (root->obj);
      reply = arena_alloc (*arena, sizeof (redisReply));
      memset (reply, 0, sizeof *reply);
      ((redisReply *) task->parent->obj)->element[task->idx] = reply;
    }
  reply->type = type;
  return reply;
}

static void
arena_free (void *root)
{
  ArenaReply *arena = arena_of (root);
  ArenaBlock *block, *next;

  for (block = arena->blocks; block != NULL; block = next)
    {
      next = block->next;
      g_free (block);
    }
  g_free (arena);
}

static void *
arena_create_string (const redisReadTask *task,
                     char                *str,
                     size_t               len)
{
  ArenaReply *arena;
  redisReply *reply = arena_new_object (task, task->type, &arena);

  reply->str = arena_alloc (arena, len + 1);
  memcpy (reply->str, str, len);
  reply->str[len] = '\0';
  reply->len = len;
  return reply;
}

/* hiredis 1.0 counts elements in a size_t. */
#if HIREDIS_MAJOR >= 1
typedef size_t ArenaCount;
#else
typedef int ArenaCount;
#endif

static void *
arena_create_array (const redisReadTask *task,
                    ArenaCount           elements)
{
  ArenaReply *arena;
  redisReply *reply = arena_new_object (task, REDIS_REPLY_ARRAY, &arena);

  reply->elements = (size_t) elements;
  if (elements > 0)
    reply->element = arena_alloc (arena, (gsize) elements * sizeof (redisReply *));
  return reply;
}

static void *
arena_create_integer (const redisReadTask *task,
                      long long            value)
{
  ArenaReply *arena;
  redisReply *reply = arena_new_object (task, REDIS_REPLY_INTEGER, &arena);

  reply->integer = value;
  return reply;
}

static void *
arena_create_nil (const redisReadTask *task)
{
  ArenaReply *arena;

  return arena_new_object (task, REDIS_REPLY_NIL, &arena);
}

/* RESP2 only: the RESP3 types (hiredis 1.0) are never asked for. */
static redisReplyObjectFunctions arena_functions = {
  .createString = arena_create_string,
  .createArray = arena_create_array,
  .createInteger = arena_create_integer,
  .createNil = arena_create_nil,
  .freeObject = arena_free,
};

/* Frees a reply read from a KdRedisConn (never with kd_redis_reply_free()). */
void
kd_redis_reply_free (redisReply *reply)
{
  arena_free (reply);
}

guint32
kd_redis_fnv1a32 (const char *data,
                  gsize       len)
{
  guint32 hash = 2166136261u;
  gsize i;

  for (i = 0; i < len; i++)
    {
      hash ^= (guint8) data[i];
      hash *= 16777619u;
    }
  return hash;
}

/* The braces are a Redis Cluster hash tag: a shard's stream and lease live
 * in the same slot, so one script may touch both. */
char *
kd_redis_stream_name (const char *name,
                      gint        shard)
{
  if (shard < 0)
    return g_strdup_printf ("%s:{u}", name);
  return g_strdup_printf ("%s:{%d}", name, shard);
}

/* Every transaction of acknowledgements and dead letters publishes there. */
char *
kd_redis_progress_channel (const char *name)
{
  return g_strdup_printf ("%s:progress", name);
}

char *
kd_redis_lease_name (const char *name,
                     gint        shard)
{
  if (shard < 0)
    return g_strdup_printf ("%s:{u}:lease", name);
  return g_strdup_printf ("%s:{%d}:lease", name, shard);
}

/* The key of a shard's fencing token, in its lease's slot. */
char *
kd_redis_fence_name (const char *name,
                     gint        shard)
{
  return g_strdup_printf ("%s:{%d}:fence", name, shard);
}

void
kd_redis_args_init (KdRedisArgs *args)
{
  args->data = g_byte_array_new ();
  args->offsets = g_array_new (FALSE, FALSE, sizeof (gsize));
  args->lengths = g_array_new (FALSE, FALSE, sizeof (gsize));
  args->argv = g_ptr_array_new ();
}

void
kd_redis_args_clear (KdRedisArgs *args)
{
  g_clear_pointer (&args->data, g_byte_array_unref);
  g_clear_pointer (&args->offsets, g_array_unref);
  g_clear_pointer (&args->lengths, g_array_unref);
  g_clear_pointer (&args->argv, g_ptr_array_unref);
}

void
kd_redis_args_reset (KdRedisArgs *args)
{
  g_byte_array_set_size (args->data, 0);
  g_array_set_size (args->offsets, 0);
  g_array_set_size (args->lengths, 0);
}

void
kd_redis_args_add (KdRedisArgs *args,
                   const void  *data,
                   gsize        len)
{
  gsize offset = args->data->len;

  /* A GByteArray holds at most G_MAXUINT bytes; the queue's fields are
   * bounded well below (KD_REDIS_QUEUE_MAX_FIELD_SIZE). */
  g_assert (len <= G_MAXUINT - offset);
  if (len > 0)
    g_byte_array_append (args->data, data, (guint) len);
  g_array_append_val (args->offsets, offset);
  g_array_append_val (args->lengths, len);
}

void
kd_redis_args_add_string (KdRedisArgs *args,
                          const char  *str)
{
  kd_redis_args_add (args, str, strlen (str));
}

void
kd_redis_args_add_printf (KdRedisArgs *args,
                          const char  *format,
                          ...)
{
  g_autofree char *str = NULL;
  char buffer[64];
  va_list ap;
  int len;

  /* Numbers, mostly: they fit the buffer, and cost no allocation. */
  va_start (ap, format);
  len = g_vsnprintf (buffer, sizeof buffer, format, ap);
  va_end (ap);
  if (len >= 0 && (gsize) len < sizeof buffer)
    {
      kd_redis_args_add (args, buffer, (gsize) len);
      return;
    }
  va_start (ap, format);
  str = g_strdup_vprintf (format, ap);
  va_end (ap);
  kd_redis_args_add_string (args, str);
}

/* The arguments as hiredis takes them: pointers into @args->data, valid
 * until the next change to @args. */
static const char **
args_argv (KdRedisArgs *args)
{
  guint i;

  g_ptr_array_set_size (args->argv, (gint) args->offsets->len);
  for (i = 0; i < args->offsets->len; i++)
    args->argv->pdata[i] = args->data->data + g_array_index (args->offsets, gsize, i);
  return (const char **) args->argv->pdata;
}

void
kd_redis_args_add_script (KdRedisArgs   *args,
                          KdRedisConn   *conn,
                          KdRedisScript  script,
                          guint          n_keys)
{
  kd_redis_args_add_string (args, "EVALSHA");
  kd_redis_args_add_string (args, conn->sha[script]);
  kd_redis_args_add_printf (args, "%u", n_keys);
}

void
kd_redis_conn_init (KdRedisConn         *conn,
                    const KdRedisServer *server,
                    gint64               timeout_us)
{
  memset (conn, 0, sizeof *conn);
  kd_redis_server_copy (&conn->server, server);
  conn->where = kd_redis_server_describe (server);
  conn->timeout_us = timeout_us;
}

/* Names the connection kd:QUEUE:ROLE:MEMBER in CLIENT LIST, so that an
 * operator (or a test) knows which is which; Redis refuses spaces and
 * newlines in a name, which become '_'. */
void
kd_redis_conn_set_name (KdRedisConn *conn,
                        const char  *queue,
                        const char  *role,
                        const char  *member)
{
  char *at;

  g_free (conn->name);
  conn->name = g_strdup_printf ("kd:%s:%s:%s", queue, role, member);
  for (at = conn->name; *at != '\0'; at++)
    if (!g_ascii_isgraph (*at))
      *at = '_';
}

void
kd_redis_conn_clear (KdRedisConn *conn)
{
  kd_redis_conn_close (conn);
  kd_redis_server_clear (&conn->server);
  g_clear_pointer (&conn->where, g_free);
  g_clear_pointer (&conn->name, g_free);
}

static void
link_free (KdRedisLink *link)
{
  kd_redis_transport_free (link->transport);
  redisReaderFree (link->reader);
  g_byte_array_unref (link->out);
  g_free (link);
}

/* Drops the connection, with the replies not read and the commands not
 * sent. */
void
kd_redis_conn_close (KdRedisConn *conn)
{
  g_clear_pointer (&conn->link, link_free);
}

gboolean
kd_redis_conn_is_connected (KdRedisConn *conn)
{
  return conn->link != NULL;
}

/* An error reply leaves the connection usable, except NOSCRIPT: the server
 * lost the scripts (a restart, SCRIPT FLUSH), and reconnecting loads them.
 * A refusal for want of a login or a permission (NOAUTH, NOPERM,
 * WRONGPASS) is G_IO_ERROR_PERMISSION_DENIED. */
static redisReply *
check_reply (KdRedisConn  *conn,
             redisReply   *reply,
             GError      **error)
{
  if (reply != NULL && reply->type == REDIS_REPLY_ERROR)
    {
      gboolean denied = g_str_has_prefix (reply->str, "NOAUTH") ||
                        g_str_has_prefix (reply->str, "NOPERM") ||
                        g_str_has_prefix (reply->str, "WRONGPASS");

      g_set_error (error, G_IO_ERROR, denied ? G_IO_ERROR_PERMISSION_DENIED : G_IO_ERROR_FAILED,
                   "Redis at %s: %s", conn->where, reply->str);
      if (g_str_has_prefix (reply->str, "NOSCRIPT"))
        kd_redis_conn_close (conn);
      kd_redis_reply_free (reply);
      return NULL;
    }
  return reply;
}

/* Whether @error is a Redis Cluster's refusal of a command sent to a node
 * that does not serve its slot (MOVED, ASK), or not now (TRYAGAIN while a
 * slot moves, CLUSTERDOWN): a new map, or a moment, cures it. */
gboolean
kd_redis_error_is_redirection (const GError *error)
{
  static const char *const codes[] = { ": MOVED ", ": ASK ", ": TRYAGAIN", ": CLUSTERDOWN" };
  guint i;

  for (i = 0; error != NULL && i < G_N_ELEMENTS (codes); i++)
    if (strstr (error->message, codes[i]) != NULL)
      return TRUE;
  return FALSE;
}

/* Sets *@reply to a reply already received, or NULL: none, or not
 * connected. An unreadable one closes the connection: FALSE, with @error
 * set. */
static gboolean
take_received (KdRedisConn  *conn,
               redisReply  **reply,
               GError      **error)
{
  void *received = NULL;

  *reply = NULL;
  if (conn->link == NULL)
    return TRUE;
  if (redisReaderGetReply (conn->link->reader, &received) != REDIS_OK)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "Redis at %s: %s", conn->where,
                   conn->link->reader->errstr[0] != '\0' ? conn->link->reader->errstr
                                                         : "unreadable reply");
      kd_redis_conn_close (conn);
      return FALSE;
    }
  *reply = received;
  return TRUE;
}

/* Sends the commands appended. */
static gboolean
flush (KdRedisConn  *conn,
       KdRedisLink  *link,
       GError      **error)
{
  if (link->out->len == 0)
    return TRUE;
  if (!kd_redis_transport_write_all (link->transport, link->out->data, link->out->len,
                                     conn->timeout_us, error))
    {
      kd_redis_conn_close (conn);
      return FALSE;
    }
  g_byte_array_set_size (link->out, 0);
  return TRUE;
}

/* Receives what arrived, waiting until @wait_until at most, and gives it to
 * the reader; on failure, closes the connection. */
static gboolean
receive (KdRedisConn  *conn,
         KdRedisLink  *link,
         gint64        wait_until,
         GError      **error)
{
  gsize n = kd_redis_transport_read (link->transport, link->in, READ_SIZE, wait_until, error);

  if (n == 0)
    {
      kd_redis_conn_close (conn);
      return FALSE;
    }
  if (redisReaderFeed (link->reader, (const char *) link->in, n) != REDIS_OK)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA, "Redis at %s: %s", conn->where,
                   link->reader->errstr);
      kd_redis_conn_close (conn);
      return FALSE;
    }
  return TRUE;
}

/* The next reply: sends what was appended, then reads until a whole reply
 * arrived, waiting until @deadline at most (-1: none), and, with
 * @idle_timeout, no more than the connection's timeout for each part of
 * it. Any failure but an error reply closes the connection. */
static redisReply *
read_reply (KdRedisConn  *conn,
            gint64        deadline,
            gboolean      idle_timeout,
            GError      **error)
{
  KdRedisLink *link = conn->link;
  GError *local_error = NULL;
  redisReply *reply;

  if (link == NULL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_NOT_CONNECTED,
                   "Redis at %s: connection lost", conn->where);
      return NULL;
    }
  if (!take_received (conn, &reply, error))
    return NULL;
  if (reply == NULL && !flush (conn, link, error))
    return NULL;
  while (reply == NULL)
    {
      gint64 wait_until = idle_timeout ? g_get_monotonic_time () + conn->timeout_us : -1;

      if (deadline >= 0)
        wait_until = wait_until >= 0 ? MIN (deadline, wait_until) : deadline;
      if (!receive (conn, link, wait_until, &local_error))
        {
          /* The caller's deadline is the caller's to know. */
          if (deadline >= 0 && g_get_monotonic_time () >= deadline)
            {
              g_clear_error (&local_error);
              g_set_error (&local_error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT, "Redis at %s: timed out",
                           conn->where);
            }
          g_propagate_error (error, local_error);
          return NULL;
        }
      if (!take_received (conn, &reply, error))
        return NULL;
    }
  return check_reply (conn, reply, error);
}

/* Appends one command of @argc strings. */
static gboolean
append_argv (KdRedisConn  *conn,
             int           argc,
             const char  **argv,
             const size_t *argvlen,
             GError      **error)
{
  char *command = NULL;
  int len = redisFormatCommandArgv (&command, argc, argv, argvlen);

  if (len < 0)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "Redis at %s: out of memory", conn->where);
      return FALSE;
    }
  g_byte_array_append (conn->link->out, (const guint8 *) command, (guint) len);
  redisFreeCommand (command);
  return TRUE;
}

/* Sends one command of @argc strings on a fresh connection and checks that
 * it succeeded; FALSE with @error set otherwise. */
static gboolean
run_setup_command (KdRedisConn  *conn,
                   int           argc,
                   const char  **argv,
                   GError      **error)
{
  size_t argvlen[3];
  redisReply *reply;
  int i;

  g_assert (argc <= (int) G_N_ELEMENTS (argvlen));
  for (i = 0; i < argc; i++)
    argvlen[i] = strlen (argv[i]);
  if (!append_argv (conn, argc, argv, argvlen, error))
    return FALSE;
  reply = read_reply (conn, -1, TRUE, error);
  if (reply == NULL)
    return FALSE;
  kd_redis_reply_free (reply);
  return TRUE;
}

/* AUTH, with the ACL user if there is one, and SELECT, on every connect: a
 * refusal is G_IO_ERROR_PERMISSION_DENIED (the server's reason, never the
 * password, in the message). */
static gboolean
log_in (KdRedisConn  *conn,
        GError      **error)
{
  GError *local_error = NULL;

  if (conn->server.password != NULL)
    {
      const char *argv[] = { "AUTH", conn->server.user, conn->server.password };
      gboolean ok;

      if (conn->server.user != NULL)
        ok = run_setup_command (conn, 3, argv, &local_error);
      else
        {
          argv[1] = conn->server.password;
          ok = run_setup_command (conn, 2, argv, &local_error);
        }
      if (!ok && conn->link == NULL)
        {
          /* The connection failed: not a refusal. */
          g_propagate_error (error, local_error);
          return FALSE;
        }
      if (!ok)
        {
          /* Only the reply's error code (WRONGPASS, ERR...): a server that
           * does not know AUTH (renamed, or a proxy) echoes its arguments,
           * the password among them. */
          const char *reply = strstr (local_error->message, ": ");
          g_autofree char *code = g_strndup (reply != NULL ? reply + 2 : "",
                                             reply != NULL ? strcspn (reply + 2, " ") : 0);

          g_set_error (error, G_IO_ERROR, G_IO_ERROR_PERMISSION_DENIED,
                       "Redis at %s refused the credentials%s%s (%s)", conn->where,
                       conn->server.user != NULL ? " of user " : "",
                       conn->server.user != NULL ? conn->server.user : "",
                       code[0] != '\0' ? code : "error");
          g_error_free (local_error);
          return FALSE;
        }
    }

  if (conn->server.db != 0)
    {
      char db[16];
      const char *argv[] = { "SELECT", db };

      g_snprintf (db, sizeof db, "%u", conn->server.db);
      if (!run_setup_command (conn, 2, argv, error))
        return FALSE;
    }

  return TRUE;
}

gboolean
kd_redis_conn_ensure (KdRedisConn  *conn,
                      GError      **error)
{
  KdRedisTransport *transport;
  guint i;

  if (conn->link != NULL)
    return TRUE;

  transport = kd_redis_transport_connect (&conn->server, conn->where, conn->timeout_us, error);
  if (transport == NULL)
    return FALSE;
  conn->link = g_new (KdRedisLink, 1);
  conn->link->transport = transport;
  conn->link->reader = redisReaderCreateWithFunctions (&arena_functions);
  conn->link->out = g_byte_array_new ();

  if (!log_in (conn, error))
    {
      kd_redis_conn_close (conn);
      return FALSE;
    }

  if (conn->name != NULL)
    {
      const char *argv[] = { "CLIENT", "SETNAME", conn->name };

      if (!run_setup_command (conn, 3, argv, error))
        {
          kd_redis_conn_close (conn);
          return FALSE;
        }
    }

  for (i = 0; i < KD_REDIS_N_SCRIPTS; i++)
    {
      const char *argv[] = { "SCRIPT", "LOAD", kd_redis_script_source (i) };
      size_t argvlen[] = { 6, 4, strlen (argv[2]) };
      redisReply *reply = NULL;

      if (append_argv (conn, 3, argv, argvlen, error))
        reply = read_reply (conn, -1, TRUE, error);
      if (reply == NULL)
        {
          kd_redis_conn_close (conn);
          return FALSE;
        }
      g_assert (reply->type == REDIS_REPLY_STRING && reply->len == 40);
      memcpy (conn->sha[i], reply->str, 41);
      kd_redis_reply_free (reply);
    }

  return TRUE;
}

redisReply *
kd_redis_conn_run (KdRedisConn  *conn,
                   KdRedisArgs  *args,
                   GError      **error)
{
  if (!kd_redis_conn_append (conn, args, error))
    return NULL;
  return read_reply (conn, -1, TRUE, error);
}

/* Appends a command, sent with the next read. */
gboolean
kd_redis_conn_append (KdRedisConn  *conn,
                      KdRedisArgs  *args,
                      GError      **error)
{
  if (!kd_redis_conn_ensure (conn, error))
    return FALSE;
  return append_argv (conn, (int) args->offsets->len, args_argv (args),
                      (const size_t *) (gpointer) args->lengths->data, error);
}

/* Sends what was appended, without reading; on failure, closes the
 * connection. */
gboolean
kd_redis_conn_flush (KdRedisConn  *conn,
                     GError      **error)
{
  return conn->link == NULL || flush (conn, conn->link, error);
}

/* Reads the reply of the oldest appended command. After an I/O error the
 * connection is closed and the other replies are lost. */
redisReply *
kd_redis_conn_read (KdRedisConn  *conn,
                    GError      **error)
{
  return read_reply (conn, -1, TRUE, error);
}

/* Sets *@reply to a reply already received, or NULL; never waits. An
 * unreadable one fails, the connection closed. */
gboolean
kd_redis_conn_read_received (KdRedisConn  *conn,
                             redisReply  **reply,
                             GError      **error)
{
  return take_received (conn, reply, error);
}

/* Reads the next reply, such as a message on a subscribed connection,
 * waiting until the monotonic time @deadline at most (-1: no limit). At
 * the deadline, fails with G_IO_ERROR_TIMED_OUT, the connection closed. */
redisReply *
kd_redis_conn_read_until (KdRedisConn  *conn,
                          gint64        deadline,
                          GError      **error)
{
  return read_reply (conn, deadline, FALSE, error);
}

/* Sends @n_commands commands in one round trip and reads their replies.
 * At the first failed one (an I/O error or an error reply) the connection
 * is closed, so that no reply is left unread on it, and the replies read
 * so far are freed. */
gboolean
kd_redis_conn_pipeline (KdRedisConn  *conn,
                        KdRedisArgs  *commands,
                        guint         n_commands,
                        redisReply  **replies,
                        GError      **error)
{
  guint i, n_read;

  for (i = 0; i < n_commands; i++)
    if (!kd_redis_conn_append (conn, &commands[i], error))
      return FALSE;
  for (n_read = 0; n_read < n_commands; n_read++)
    {
      replies[n_read] = kd_redis_conn_read (conn, error);
      if (replies[n_read] == NULL)
        break;
    }
  if (n_read == n_commands)
    return TRUE;

  kd_redis_conn_close (conn);
  for (i = 0; i < n_read; i++)
    g_clear_pointer (&replies[i], kd_redis_reply_free);
  return FALSE;
}

/* Runs @n_commands commands in one MULTI/EXEC transaction, in one round
 * trip. Returns EXEC's reply: an array of the commands' replies, or nil if
 * Redis refused to run them because a WATCHed key changed. Fails as
 * kd_redis_conn_pipeline() does, and also when one of the commands failed
 * (an error inside the array). */
redisReply *
kd_redis_conn_transaction (KdRedisConn  *conn,
                           KdRedisArgs  *commands,
                           guint         n_commands,
                           GError      **error)
{
  KdRedisArgs multi, exec;
  redisReply *reply = NULL;
  gboolean ok;
  guint i;

  kd_redis_args_init (&multi);
  kd_redis_args_init (&exec);
  kd_redis_args_add_string (&multi, "MULTI");
  kd_redis_args_add_string (&exec, "EXEC");
  ok = kd_redis_conn_append (conn, &multi, error);
  for (i = 0; i < n_commands && ok; i++)
    ok = kd_redis_conn_append (conn, &commands[i], error);
  ok = ok && kd_redis_conn_append (conn, &exec, error);
  kd_redis_args_clear (&multi);
  kd_redis_args_clear (&exec);

  /* +OK, then +QUEUED for each command. */
  for (i = 0; i < n_commands + 1 && ok; i++)
    {
      reply = kd_redis_conn_read (conn, error);
      ok = reply != NULL;
      g_clear_pointer (&reply, kd_redis_reply_free);
    }
  if (ok)
    reply = kd_redis_conn_read (conn, error);
  if (reply != NULL && reply->type == REDIS_REPLY_ARRAY)
    for (i = 0; i < reply->elements && ok; i++)
      if (reply->element[i]->type == REDIS_REPLY_ERROR)
        {
          g_set_error (error, G_IO_ERROR, G_IO_ERROR_FAILED, "Redis at %s: %s", conn->where,
                       reply->element[i]->str);
          ok = FALSE;
        }
  if (reply != NULL && reply->type != REDIS_REPLY_ARRAY && reply->type != REDIS_REPLY_NIL)
    {
      g_set_error (error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                   "Redis at %s: unexpected reply to EXEC", conn->where);
      ok = FALSE;
    }
  if (!ok || reply == NULL)
    {
      /* The replies after a failure are not read: start afresh. */
      g_clear_pointer (&reply, kd_redis_reply_free);
      kd_redis_conn_close (conn);
    }
  return reply;
}
