/* kd-redis-harness.h: a redis-server, worker processes and their logs, for test-redis-queue.c
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kd-redis-harness.c says how the harness works, and what each function
 * does where it defines it.
 */

#pragma once

#include <gio/gio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>

#include "kd-test-util.h"

G_BEGIN_DECLS

/* How long one wait of these tests may take before it fails: twice the
 * suite's, as a single wait here spans worker processes, a Redis restart
 * or a lease running out, and the AddressSanitizer build runs the whole
 * program in about four minutes. */
#define KD_REDIS_TEST_DEADLINE_US (2 * KD_TEST_DEADLINE_US)

/* ---- Least privilege ---------------------------------------------------- */

/* The commands a worker and a producer need, as docs/scaling-out.md lists
 * them (on a cluster, with CLUSTER_COMMANDS and, for a producer,
 * PRODUCER_CLUSTER_COMMANDS too). */
#define WORKER_COMMANDS                                                        \
  "+client|setname", "+script|load", "+evalsha", "+multi", "+exec",            \
  "+xreadgroup", "+xread", "+xack", "+xadd", "+xgroup|create",                 \
  "+xgroup|delconsumer", "+xinfo|groups", "+xinfo|consumers", "+xautoclaim",   \
  "+xpending", "+xrange", "+xtrim", "+hsetnx", "+hget", "+pexpire", "+get",    \
  "+set", "+del", "+zadd", "+zrem", "+zremrangebyscore", "+zrangebyscore",     \
  "+zscore", "+time", "+publish", "+subscribe", "+watch", "+mget", "+incr", "+type"
#define PRODUCER_COMMANDS                                                      \
  "+client|setname", "+script|load", "+evalsha", "+xadd", "+xgroup|create",    \
  "+xinfo|groups", "+xrange", "+hsetnx", "+hget", "+subscribe", "+type",       \
  "+xpending", "+xtrim"
#define CLUSTER_COMMANDS "+cluster|slots"
#define PRODUCER_CLUSTER_COMMANDS "+wait", "+multi", "+exec"

/* ---- Certificates made with openssl ------------------------------------ */

/* A CA, the server's certificate from it (for 127.0.0.1 and localhost),
 * a client's, and another CA that signed none of them: PEM files. */
typedef struct
{
  char *ca;
  char *server_cert;
  char *server_key;
  char *client_cert;
  char *client_key;
  char *other_ca;
} TlsFiles;

gboolean       need_openssl       (void);
gboolean       need_tls           (void);
void           tls_files_make     (TlsFiles   *files,
                                   const char *dir);
void           tls_files_clear    (TlsFiles   *files);

/* ---- A redis-server of our own ----------------------------------------- */

typedef struct _Server Server;
typedef struct _Place Place;

/* Where a queue's streams are, for the looks at what it holds (below):
 * the nodes, which of them holds each stream, and how to open a queue on
 * them. A lone server is a place of one node, holding every stream: its
 * @place, which server_start() sets up. A cluster's is its masters
 * (kd-redis-cluster-harness.c). */
struct _Place
{
  Server        *nodes;
  guint          n_nodes;
  /* Fills @node_of with the node holding each stream of queue @name: the
   * shards' in order, then the unkeyed one's. NULL: the first node holds
   * every stream. */
  void         (*locate)     (Place      *place,
                              const char *name,
                              guint       n_shards,
                              gint       *node_of);
  /* NULL: open_queue() on the first node. */
  KdRedisQueue *(*open_queue) (Place      *place,
                               const char *name,
                               guint       n_shards);
};

struct _Server
{
  char        *dir;
  guint        port;
  gboolean     fsync_always;
  const char * const *extra_args;   /* more redis-server arguments, NULL-terminated */
  gboolean     tls;                 /* also a TLS port, which queues and workers use */
  TlsFiles     tls_files;           /* with @tls: made in @dir by server_start() */
  guint        tls_port;
  GSubprocess *process;
  Place        place;               /* the server alone, for the looks at its queues */
};

void           find_redis_server  (void);
void           die_with_parent    (gpointer    data);
guint          free_port          (void);
gboolean       need_redis         (void);
redisContext  *server_connect     (Server     *server);
void           server_launch      (Server     *server);
void           server_start       (Server     *server);
void           server_freeze      (Server     *server);
void           server_kill        (Server     *server);
void           server_stop        (Server     *server);
void           remove_dir         (const char *path);
KdRedisQueue  *open_queue         (Server     *server,
                                   const char *name,
                                   guint       n_shards);

/* ---- Running a queue's jobs in this process ------------------------------ */

/* What seen_record(), a handler, saw: a keyed job's payload is its number
 * within its key, counting from 1. */
typedef struct
{
  GMutex      lock;
  GHashTable *last;    /* key → last number run */
  guint       keyed;
  guint       unkeyed;
  gboolean    out_of_order;
} Seen;

void           seen_init          (Seen         *seen);
void           seen_clear         (Seen         *seen);
gboolean       seen_record        (KdJob        *job,
                                   gpointer      user_data,
                                   GError      **error);
void           run_until_done     (KdRedisQueue *queue,
                                   guint         n_workers,
                                   Seen         *seen);

/* ---- What the queue holds ---------------------------------------------- */

typedef struct
{
  guint64 entries;     /* in all the streams */
  guint64 unfinished;  /* pending (read, not acknowledged) or not read yet */
} Progress;

char          *stream_name        (const char *name,
                                   gint        shard);
void           queue_progress     (Place      *place,
                                   const char *name,
                                   guint       n_shards,
                                   Progress   *progress);
void           wait_finished      (Place      *place,
                                   const char *name,
                                   guint       n_shards,
                                   guint64     total,
                                   guint64     done);
guint64        consumer_pending   (Place      *place,
                                   const char *name,
                                   guint       n_shards,
                                   const char *consumer);
guint64        streams_length     (Place      *place,
                                   const char *name,
                                   guint       n_shards);
guint64        unfinished_present (Place      *place,
                                   const char *name,
                                   guint       n_shards);
void           wait_trimmed       (Place      *place,
                                   const char *name,
                                   guint       n_shards,
                                   guint64     length);
void           wait_forgotten     (Place      *place,
                                   const char *name,
                                   guint       n_shards,
                                   const char *consumer);

/* ---- Jobs: key-K numbered from 1, in a shuffled order of keys ---------- */

typedef struct
{
  guint  n_keys;
  guint *count;        /* per key: how many jobs */
  guint  total;
} Jobs;

void           produce            (Server     *server,
                                   const char *name,
                                   guint       n_shards,
                                   guint       n_jobs,
                                   guint       n_keys,
                                   Jobs       *jobs);
void           produce_into       (KdRedisQueue *queue,
                                   guint         n_jobs,
                                   guint         n_keys,
                                   Jobs         *jobs);
guint          scaled             (guint       n);

/* ---- Worker processes -------------------------------------------------- */

typedef struct
{
  GSubprocess      *process;
  GDataInputStream *stdout_lines;
  char             *log;
  char             *name;    /* its consumer name */
  char             *out;     /* its output, once it finished */
} Worker;

Worker        *worker_start       (Server     *server,
                                   const char *name,
                                   guint       index,
                                   ...);
Worker        *worker_startv      (const char         *dir,
                                   const char * const *connection,
                                   const char         *name,
                                   guint               index,
                                   va_list             ap);
void           worker_signal      (Worker     *worker,
                                   int         signum);
void           worker_finish      (Worker     *worker,
                                   gboolean    killed);
void           worker_free        (Worker     *worker);
guint64        stat_of            (const char *out,
                                   const char *name);
void           finish_workers     (Worker    **workers,
                                   guint       n_workers,
                                   gint        killed);
guint64        workers_stat       (Worker    **workers,
                                   guint       n_workers,
                                   const char *name);
void           wait_holding       (Place      *place,
                                   const char *name,
                                   guint       n_shards,
                                   Worker     *worker);

/* ---- The logs ---------------------------------------------------------- */

typedef struct
{
  guint64 runs;
  guint64 duplicates;  /* runs of a job that had completed already */
  guint64 fenced_reruns;  /* runs taken over, each rerun under another token */
} Verdict;

void           check_logs         (Worker    **workers,
                                   guint       n_workers,
                                   Jobs       *jobs,
                                   guint       fail_key,
                                   guint       fail_attempts,
                                   Verdict    *verdict);

G_END_DECLS
