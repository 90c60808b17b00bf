/* kd-redis-cluster-harness.c: a Redis Cluster of our own, its failover, and queues on it, for test-redis-cluster.c
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A cluster is 3 masters and a replica of each: 6 redis-servers on
 * 127.0.0.1, started by kd-redis-harness.c's server_launch() (appendonly
 * yes, each in a directory of its own under the cluster's, on a free port)
 * with cluster mode on, its bus on a free port too (--cluster-port), and a
 * node timeout of CLUSTER_NODE_TIMEOUT_MS so that a failover takes seconds.
 * `redis-cli --cluster create` makes the cluster of them.
 *
 * Redis announces no event when its cluster has converged: not when the
 * slots are assigned and every node agrees on who serves them, not when a
 * replica's link to its master is up, nor when a replica has taken its
 * failed master's place. But a node changes its view of the cluster only
 * with a write to a file of its own: its nodes.conf (slots, epochs, a
 * node marked failed, a master's replicas), its log (the cluster's state
 * going fail or ok, a replica's sync done, an election won), its
 * append-only file (the writes a master takes and a replica applies).
 * So the harness looks (CLUSTER INFO, CLUSTER SLOTS, INFO replication on
 * every living node, which write nothing) each time a node's directory or
 * append-only directory changes (inotify), until the cluster is whole,
 * with the deadline of every wait here, KD_REDIS_TEST_DEADLINE_US. The
 * queue's progress is waited for by kd-redis-harness.c's waits, with
 * kd_redis_queue_wait_backlog(), and trimming and forgetting with keyspace
 * events, here from every master holding one of the queue's streams.
 *
 * The cluster is whole when every living node says cluster_state:ok with
 * all 16384 slots ok, every node's CLUSTER SLOTS covers every slot with a
 * living node and names the same master for each as every other node's,
 * CLUSTER_MASTERS nodes serve slots, each of them says it is a master, and
 * every other living node is a replica of one of them whose link is up,
 * and which every living node's CLUSTER NODES knows as that master's (a
 * master ignores the manual failover of a replica it does not know yet).
 *
 * The queues and worker processes reach the cluster by the URL
 * redis+cluster://127.0.0.1:PORT, PORT a master's; worker processes log
 * to the cluster's directory, as kd-redis-harness.c's worker_start() does
 * to its server's, so that worker_finish(), stat_of() and check_logs()
 * apply unchanged. The cluster is a Place (kd-redis-harness.h), for
 * kd-redis-harness.c's looks at what a queue holds: they go to the master
 * that serves each stream's slot.
 */

#include "config.h"

#include <gio/gio.h>
#include <glib/gstdio.h>
#include <hiredis/hiredis.h>
#include <kdispatch/kdispatch.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "kd-redis-cluster-harness.h"
#include "kd-redis-harness.h"
#include "kd-test-util.h"

#define CLUSTER_SLOTS 16384

static void          locate_streams   (Place      *place,
                                       const char *name,
                                       guint       n_shards,
                                       gint       *node_of);
static KdRedisQueue *place_open_queue (Place      *place,
                                       const char *name,
                                       guint       n_shards);

/* ---- Looking at the nodes ---------------------------------------------- */

static char *redis_cli_path;

/* What a cluster of these tests needs: redis-server and redis-cli. */
gboolean
need_redis_cluster (void)
{
  if (!need_redis ())
    return FALSE;
  if (redis_cli_path == NULL)
    redis_cli_path = g_find_program_in_path ("redis-cli");
  if (redis_cli_path == NULL)
    {
      g_test_skip ("redis-cli is not installed (Debian: apt-get install redis-tools)");
      return FALSE;
    }
  return TRUE;
}

static gboolean
node_alive (Cluster *cluster,
            guint    node)
{
  return cluster->nodes[node].process != NULL;
}

/* The node listening on @port, or -1 if none of ours does. */
static gint
node_of_port (Cluster   *cluster,
              long long  port)
{
  guint i;

  for (i = 0; i < CLUSTER_NODES; i++)
    if ((long long) cluster->nodes[i].port == port)
      return (gint) i;
  return -1;
}

static redisContext *
node_connect (Cluster *cluster,
              guint    node)
{
  redisContext *c = server_connect (&cluster->nodes[node]);

  if (c == NULL)
    g_error ("cluster node %u (port %u) does not answer", node, cluster->nodes[node].port);
  return c;
}

/* The first living node. */
static guint
any_node (Cluster *cluster)
{
  guint i;

  for (i = 0; i < CLUSTER_NODES; i++)
    if (node_alive (cluster, i))
      return i;
  g_assert_not_reached ();
}

/* The value of @field in @text, an INFO-like reply of field:value lines;
 * NULL if it has none. */
static char *
info_field (const char *text,
            const char *field)
{
  g_autofree char *needle = g_strdup_printf ("%s:", field);
  const char *at = text;
  gsize len = strlen (needle);

  while (at != NULL && *at != '\0')
    {
      if (strncmp (at, needle, len) == 0)
        return g_strndup (at + len, strcspn (at + len, "\r\n"));
      at = strchr (at, '\n');
      if (at != NULL)
        at++;
    }
  return NULL;
}

/* Runs @command (no arguments) on @c and returns its reply's text. */
static char *
command_text (redisContext *c,
              const char   *command)
{
  redisReply *reply = redisCommand (c, command);
  char *text;

  g_assert_nonnull (reply);
  if (reply->type != REDIS_REPLY_STRING)
    g_error ("%s: %s", command, reply->type == REDIS_REPLY_ERROR ? reply->str : "not a string");
  text = g_strndup (reply->str, reply->len);
  freeReplyObject (reply);
  return text;
}

/* What one node says of the cluster. */
typedef struct
{
  gint8    map[CLUSTER_SLOTS];   /* the node serving each slot, -1 for none */
  gboolean replica;
  gint     master;               /* with @replica: the node it replicates */
  gboolean link_up;              /* with @replica: its link to its master */
  guint64  offset;               /* with @replica, the replication offset it has processed; else the master's */
  gint8    replica_of[CLUSTER_NODES];  /* by CLUSTER NODES here: the node each one replicates, -1 for none */
} NodeView;

/* Reads @c's CLUSTER SLOTS into @map; FALSE, saying why in @why, if it
 * names a node that is not ours. */
static gboolean
read_slot_map (Cluster      *cluster,
               redisContext *c,
               gint8        *map,
               GString      *why)
{
  redisReply *reply = redisCommand (c, "CLUSTER SLOTS");
  gboolean ok = TRUE;
  gsize i;

  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_ARRAY);
  memset (map, -1, CLUSTER_SLOTS);
  /* [[first, last, [ip, port, id, {metadata}], replicas...], ...] */
  for (i = 0; ok && i < reply->elements; i++)
    {
      redisReply *range = reply->element[i];
      redisReply *master = range->element[2];
      gint node = node_of_port (cluster, master->element[1]->integer);
      long long slot;

      g_assert_cmpuint (range->elements, >=, 3);
      if (node < 0 || strcmp (master->element[0]->str, "127.0.0.1") != 0)
        {
          g_string_printf (why, "CLUSTER SLOTS names %s:%lld, not one of our nodes",
                           master->element[0]->str, master->element[1]->integer);
          ok = FALSE;
          break;
        }
      for (slot = range->element[0]->integer; slot <= range->element[1]->integer; slot++)
        map[slot] = (gint8) node;
    }
  freeReplyObject (reply);
  return ok;
}

/* Reads, from this node's CLUSTER NODES, which node each node replicates
 * (-1: none, or not known here). A master acts on its replica's manual
 * failover, and votes in a replica's election, only once its own table
 * says that the replica is its master's: before that, the replica's
 * CLUSTER FAILOVER times out unheeded. */
static void
read_replicas (Cluster      *cluster,
               redisContext *c,
               NodeView     *view)
{
  g_autofree char *text = command_text (c, "CLUSTER NODES");
  g_auto (GStrv) lines = g_strsplit (text, "\n", -1);
  g_autoptr (GHashTable) node_of_id = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, NULL);
  guint i;

  memset (view->replica_of, -1, sizeof view->replica_of);
  /* <id> <ip:port@cport[,hostname]> <flags> <master id or -> ... */
  for (i = 0; lines[i] != NULL; i++)
    {
      g_auto (GStrv) fields = g_strsplit (lines[i], " ", 5);
      const char *colon;

      if (g_strv_length (fields) < 4 || (colon = strrchr (fields[1], ':')) == NULL)
        continue;
      g_hash_table_insert (node_of_id, g_strdup (fields[0]),
                           GINT_TO_POINTER (node_of_port (cluster, g_ascii_strtoll (colon + 1, NULL, 10)) + 1));
    }
  for (i = 0; lines[i] != NULL; i++)
    {
      g_auto (GStrv) fields = g_strsplit (lines[i], " ", 5);
      gint node, master;

      if (g_strv_length (fields) < 4 || strstr (fields[2], "slave") == NULL)
        continue;
      node = GPOINTER_TO_INT (g_hash_table_lookup (node_of_id, fields[0])) - 1;
      master = GPOINTER_TO_INT (g_hash_table_lookup (node_of_id, fields[3])) - 1;
      if (node >= 0)
        view->replica_of[node] = (gint8) master;
    }
}

/* Fills @view with what node @node says of the cluster: FALSE, saying why
 * in @why, if it does not say the cluster is ok. */
static gboolean
look_at_node (Cluster  *cluster,
              guint     node,
              NodeView *view,
              GString  *why)
{
  redisContext *c = node_connect (cluster, node);
  g_autofree char *info = command_text (c, "CLUSTER INFO");
  g_autofree char *state = info_field (info, "cluster_state");
  g_autofree char *slots_ok = info_field (info, "cluster_slots_ok");
  g_autofree char *replication = command_text (c, "INFO replication");
  g_autofree char *role = info_field (replication, "role");
  g_autofree char *master_port = info_field (replication, "master_port");
  g_autofree char *link = info_field (replication, "master_link_status");
  g_autofree char *offset = NULL;
  gboolean ok;

  ok = read_slot_map (cluster, c, view->map, why);
  read_replicas (cluster, c, view);
  redisFree (c);
  view->replica = g_strcmp0 (role, "slave") == 0;
  view->master = view->replica && master_port != NULL ? node_of_port (cluster, g_ascii_strtoll (master_port, NULL, 10)) : -1;
  view->link_up = g_strcmp0 (link, "up") == 0;
  offset = info_field (replication, view->replica ? "slave_repl_offset" : "master_repl_offset");
  view->offset = offset != NULL ? g_ascii_strtoull (offset, NULL, 10) : 0;
  if (!ok)
    return FALSE;
  if (g_strcmp0 (state, "ok") != 0 || g_strcmp0 (slots_ok, "16384") != 0)
    {
      g_string_printf (why, "node %u (port %u) says cluster_state:%s, cluster_slots_ok:%s", node,
                       cluster->nodes[node].port, state, slots_ok);
      return FALSE;
    }
  return TRUE;
}

/* Whether the cluster is whole (see the top of this file), with every
 * living node's view in @views; if not, says why in @why. */
static gboolean
whole (Cluster  *cluster,
       NodeView *views,
       GString  *why)
{
  gboolean serves[CLUSTER_NODES] = { FALSE };
  gint first = -1;
  guint i, slot, n_masters = 0;

  for (i = 0; i < CLUSTER_NODES; i++)
    {
      if (!node_alive (cluster, i))
        continue;
      if (!look_at_node (cluster, i, &views[i], why))
        return FALSE;
      for (slot = 0; slot < CLUSTER_SLOTS; slot++)
        {
          gint master = views[i].map[slot];

          if (master < 0)
            {
              g_string_printf (why, "node %u: no master for slot %u", i, slot);
              return FALSE;
            }
          if (!node_alive (cluster, (guint) master))
            {
              g_string_printf (why, "node %u: slot %u still served by node %d, killed", i, slot, master);
              return FALSE;
            }
          if (first >= 0 && master != views[first].map[slot])
            {
              g_string_printf (why, "node %u: slot %u served by node %d, node %d says node %d", i, slot,
                               master, first, views[first].map[slot]);
              return FALSE;
            }
          serves[master] = TRUE;
        }
      if (first < 0)
        first = (gint) i;
    }

  for (i = 0; i < CLUSTER_NODES; i++)
    {
      if (!node_alive (cluster, i))
        continue;
      if (serves[i])
        {
          n_masters++;
          if (views[i].replica)
            {
              g_string_printf (why, "node %u serves slots but says it is a replica", i);
              return FALSE;
            }
        }
      else if (!views[i].replica || views[i].master < 0 || !serves[views[i].master] || !views[i].link_up)
        {
          g_string_printf (why, "node %u: not a replica of a master with its link up (replica %d, "
                           "of node %d, link %s)", i, views[i].replica, views[i].master,
                           views[i].link_up ? "up" : "down");
          return FALSE;
        }
      else
        {
          guint j;

          for (j = 0; j < CLUSTER_NODES; j++)
            if (node_alive (cluster, j) && views[j].replica_of[i] != views[i].master)
              {
                g_string_printf (why, "node %u does not know node %u as node %d's replica yet (it says "
                                 "node %d's)", j, i, views[i].master, views[j].replica_of[i]);
                return FALSE;
              }
        }
    }
  if (n_masters != CLUSTER_MASTERS)
    {
      g_string_printf (why, "%u masters serve the slots, not %u", n_masters, CLUSTER_MASTERS);
      return FALSE;
    }
  return TRUE;
}

/* Looks at the cluster until @done holds, again each time a node writes
 * a file (see the top of this file), failing at the deadline with what it
 * last saw. The watches are set before the first look, so that a change
 * made between a look and the wait that follows still wakes it. */
static void
wait_cluster (Cluster     *cluster,
              gboolean   (*done) (Cluster  *cluster,
                                  NodeView *views,
                                  gpointer  data,
                                  GString  *why),
              gpointer     data,
              const char  *what)
{
  gint64 deadline = g_get_monotonic_time () + KD_REDIS_TEST_DEADLINE_US;
  g_autoptr (GString) why = g_string_new (NULL);
  g_autofree NodeView *views = g_new0 (NodeView, CLUSTER_NODES);
  int watches = inotify_init1 (IN_CLOEXEC | IN_NONBLOCK);
  guint i;

  g_assert_cmpint (watches, >=, 0);
  for (i = 0; i < CLUSTER_NODES; i++)
    {
      g_autofree char *aof = g_build_filename (cluster->nodes[i].dir, "appendonlydir", NULL);
      guint32 mask = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE;

      g_assert_cmpint (inotify_add_watch (watches, cluster->nodes[i].dir, mask), >=, 0);
      /* Made by the server as it starts: a node starting still has none. */
      inotify_add_watch (watches, aof, mask);
    }

  while (!done (cluster, views, data, why))
    {
      struct pollfd changed = { watches, POLLIN, 0 };
      gint64 left = deadline - g_get_monotonic_time ();
      char events[4096];

      if (left <= 0 || poll (&changed, 1, (int) MAX (left / 1000, 1)) == 0)
        g_error ("%s: not in %d s: %s", what, (int) (KD_REDIS_TEST_DEADLINE_US / G_USEC_PER_SEC), why->str);
      while (read (watches, events, sizeof events) > 0)
        ;
    }
  close (watches);
}

static gboolean
whole_done (Cluster  *cluster,
            NodeView *views,
            gpointer  data,
            GString  *why)
{
  return whole (cluster, views, why);
}

/* Waits until the cluster is whole: every slot served by a living master
 * that every node names, every other node a replica with its link up. */
void
cluster_wait_converged (Cluster *cluster)
{
  wait_cluster (cluster, whole_done, NULL, "the cluster to converge");
}

static gboolean
replicated_done (Cluster  *cluster,
                 NodeView *views,
                 gpointer  data,
                 GString  *why)
{
  gint64 *targets = data;
  guint i;

  if (!whole (cluster, views, why))
    return FALSE;
  for (i = 0; i < CLUSTER_NODES; i++)
    if (node_alive (cluster, i) && !views[i].replica && targets[i] < 0)
      targets[i] = (gint64) views[i].offset;
  for (i = 0; i < CLUSTER_NODES; i++)
    if (node_alive (cluster, i) && views[i].replica && (gint64) views[i].offset < targets[views[i].master])
      {
        g_string_printf (why, "node %u has replicated up to %" G_GUINT64_FORMAT " of node %d's %"
                         G_GINT64_FORMAT, i, views[i].offset, views[i].master, targets[views[i].master]);
        return FALSE;
      }
  return TRUE;
}

/* Waits until every replica has processed every write its master had
 * taken when this was called (Redis replicates asynchronously: a write a
 * master acknowledged may be lost with it until then). */
void
cluster_wait_replicated (Cluster *cluster)
{
  gint64 targets[CLUSTER_NODES];
  guint i;

  for (i = 0; i < CLUSTER_NODES; i++)
    targets[i] = -1;
  wait_cluster (cluster, replicated_done, targets, "the replicas to catch up");
}

/* ---- Making and unmaking the cluster ------------------------------------ */

typedef struct
{
  GAsyncResult *result;
} Outcome;

static void
keep_result (GObject      *source,
             GAsyncResult *result,
             gpointer      data)
{
  Outcome *outcome = data;

  outcome->result = g_object_ref (result);
}

static gboolean
set_flag (gpointer data)
{
  *(gboolean *) data = TRUE;
  return G_SOURCE_REMOVE;
}

/* Runs redis-cli with @args (NULL-terminated) and returns its output (its
 * standard error merged in); fails if it does not exit with 0 before the
 * deadline. Its end is waited for on a main context of our own, with the
 * deadline as a timeout source. */
static char *
run_redis_cli (const char * const *args)
{
  g_autoptr (GSubprocessLauncher) launcher = g_subprocess_launcher_new (G_SUBPROCESS_FLAGS_STDOUT_PIPE |
                                                                        G_SUBPROCESS_FLAGS_STDERR_MERGE);
  g_autoptr (GPtrArray) argv = g_ptr_array_new ();
  g_autoptr (GSubprocess) process = NULL;
  g_autoptr (GMainContext) context = g_main_context_new ();
  g_autoptr (GSource) timeout = g_timeout_source_new ((guint) (KD_REDIS_TEST_DEADLINE_US / 1000));
  g_autoptr (GError) error = NULL;
  Outcome outcome = { NULL };
  gboolean timed_out = FALSE;
  char *out = NULL;
  guint i;

  g_ptr_array_add (argv, redis_cli_path);
  for (i = 0; args[i] != NULL; i++)
    g_ptr_array_add (argv, (gpointer) args[i]);
  g_ptr_array_add (argv, NULL);
  g_subprocess_launcher_set_child_setup (launcher, die_with_parent, NULL, NULL);
  process = g_subprocess_launcher_spawnv (launcher, (const char * const *) argv->pdata, &error);
  g_assert_no_error (error);

  g_main_context_push_thread_default (context);
  g_source_set_callback (timeout, set_flag, &timed_out, NULL);
  g_source_attach (timeout, context);
  g_subprocess_communicate_utf8_async (process, NULL, NULL, keep_result, &outcome);
  while (outcome.result == NULL && !timed_out)
    g_main_context_iteration (context, TRUE);
  g_source_destroy (timeout);
  if (outcome.result == NULL)
    {
      g_subprocess_force_exit (process);
      g_error ("redis-cli %s: not done in %d s", args[0], (int) (KD_REDIS_TEST_DEADLINE_US / G_USEC_PER_SEC));
    }
  g_subprocess_communicate_utf8_finish (process, outcome.result, &out, NULL, &error);
  g_object_unref (outcome.result);
  g_main_context_pop_thread_default (context);
  g_assert_no_error (error);
  g_subprocess_wait (process, NULL, &error);
  g_assert_no_error (error);
  if (!g_subprocess_get_if_exited (process) || g_subprocess_get_exit_status (process) != 0)
    g_error ("redis-cli %s failed:\n%s", args[0], out);
  return out;
}

/* A port no other node of @cluster uses (a node's or its bus's). */
static guint
unused_port (Cluster *cluster,
             guint    upto)
{
  for (;;)
    {
      guint port = free_port ();
      gboolean used = FALSE;
      guint i;

      for (i = 0; i < upto; i++)
        used = used || cluster->nodes[i].port == port || cluster->bus_ports[i] == port;
      if (!used)
        return port;
    }
}

/* Starts the 6 nodes, makes a cluster of them, and waits until it is
 * whole. */
void
cluster_start (Cluster *cluster)
{
  g_autoptr (GPtrArray) create = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GError) error = NULL;
  g_autofree char *out = NULL;
  gint64 start = g_get_monotonic_time (), created;
  guint i;

  memset (cluster, 0, sizeof *cluster);
  cluster->place = (Place) { cluster->nodes, CLUSTER_NODES, locate_streams, place_open_queue };
  cluster->dir = g_dir_make_tmp ("kd-redis-cluster-XXXXXX", &error);
  g_assert_no_error (error);
  g_ptr_array_add (create, g_strdup ("--cluster"));
  g_ptr_array_add (create, g_strdup ("create"));
  for (i = 0; i < CLUSTER_NODES; i++)
    {
      Server *node = &cluster->nodes[i];

      node->dir = g_strdup_printf ("%s/node-%u", cluster->dir, i);
      g_assert_cmpint (g_mkdir (node->dir, 0700), ==, 0);
      node->port = unused_port (cluster, i);
      /* Its own port is set: it must not be taken as a bus port. */
      cluster->bus_ports[i] = unused_port (cluster, i + 1);
      /* A master sends its data to a new replica at once, not after the
       * 5 s Redis waits by default for more replicas to share the
       * transfer. */
      cluster->node_args[i] = g_new0 (char *, 11);
      cluster->node_args[i][0] = g_strdup ("--cluster-enabled");
      cluster->node_args[i][1] = g_strdup ("yes");
      cluster->node_args[i][2] = g_strdup ("--cluster-config-file");
      cluster->node_args[i][3] = g_strdup ("nodes.conf");
      cluster->node_args[i][4] = g_strdup ("--cluster-node-timeout");
      cluster->node_args[i][5] = g_strdup_printf ("%u", CLUSTER_NODE_TIMEOUT_MS);
      cluster->node_args[i][6] = g_strdup ("--cluster-port");
      cluster->node_args[i][7] = g_strdup_printf ("%u", cluster->bus_ports[i]);
      cluster->node_args[i][8] = g_strdup ("--repl-diskless-sync-delay");
      cluster->node_args[i][9] = g_strdup ("0");
      node->extra_args = (const char * const *) cluster->node_args[i];
      server_launch (node);
      g_ptr_array_add (create, g_strdup_printf ("127.0.0.1:%u", node->port));
    }

  /* The first CLUSTER_MASTERS nodes become the masters, the others their
   * replicas. */
  g_ptr_array_add (create, g_strdup ("--cluster-replicas"));
  g_ptr_array_add (create, g_strdup ("1"));
  g_ptr_array_add (create, g_strdup ("--cluster-yes"));
  g_ptr_array_add (create, NULL);
  out = run_redis_cli ((const char * const *) create->pdata);
  created = g_get_monotonic_time ();
  cluster_wait_converged (cluster);
  g_test_message ("cluster of %u nodes: made by redis-cli in %.2f s, whole %.2f s after its start",
                  CLUSTER_NODES, (created - start) / 1e6, (g_get_monotonic_time () - start) / 1e6);
}

/* Starts a killed node again, on its port and directory, and waits until
 * the cluster is whole again: a master that was replaced comes back as
 * its replica's replica. */
void
cluster_restart_node (Cluster *cluster,
                      guint    node)
{
  gint64 start = g_get_monotonic_time ();

  g_assert_false (node_alive (cluster, node));
  server_launch (&cluster->nodes[node]);
  cluster_wait_converged (cluster);
  g_test_message ("node %u (port %u) restarted: the cluster is whole %.2f s later", node,
                  cluster->nodes[node].port, (g_get_monotonic_time () - start) / 1e6);
}

/* Stops every node still running and removes the cluster's directories,
 * the workers' logs included. */
void
cluster_stop (Cluster *cluster)
{
  guint i;

  for (i = 0; i < CLUSTER_NODES; i++)
    {
      if (node_alive (cluster, i))
        server_kill (&cluster->nodes[i]);
      remove_dir (cluster->nodes[i].dir);
      g_clear_pointer (&cluster->nodes[i].dir, g_free);
      g_clear_pointer (&cluster->node_args[i], g_strfreev);
      cluster->nodes[i].extra_args = NULL;
    }
  remove_dir (cluster->dir);
  g_clear_pointer (&cluster->dir, g_free);
}

/* ---- Keys, slots and masters ------------------------------------------- */

/* The slot of @key, as the cluster computes it. */
static gint
slot_of (Cluster    *cluster,
         const char *key)
{
  redisContext *c = node_connect (cluster, any_node (cluster));
  redisReply *reply = redisCommand (c, "CLUSTER KEYSLOT %s", key);
  gint slot;

  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_INTEGER);
  slot = (gint) reply->integer;
  freeReplyObject (reply);
  redisFree (c);
  return slot;
}

/* The node serving each slot, as a living node says (to free). */
static gint8 *
slot_map (Cluster *cluster)
{
  g_autoptr (GString) why = g_string_new (NULL);
  gint8 *map = g_new (gint8, CLUSTER_SLOTS);
  redisContext *c = node_connect (cluster, any_node (cluster));

  if (!read_slot_map (cluster, c, map, why))
    g_error ("%s", why->str);
  redisFree (c);
  return map;
}

/* The node serving @key's slot, as a living node says. */
guint
cluster_master_of (Cluster    *cluster,
                   const char *key)
{
  g_autofree gint8 *map = slot_map (cluster);
  gint slot = slot_of (cluster, key);

  g_assert_cmpint (map[slot], >=, 0);
  return (guint) map[slot];
}

/* A connection to the master serving @key (to look at what it holds);
 * that master's node in @node unless NULL. */
redisContext *
cluster_connect_key (Cluster    *cluster,
                     const char *key,
                     guint      *node)
{
  guint master = cluster_master_of (cluster, key);

  g_assert_true (node_alive (cluster, master));
  if (node != NULL)
    *node = master;
  return node_connect (cluster, master);
}

/* The URL of the cluster, naming a living master as the seed: the first
 * one in the nodes' order. */
char *
cluster_url (Cluster *cluster)
{
  g_autofree gint8 *map = slot_map (cluster);
  guint i, slot;

  for (i = 0; i < CLUSTER_NODES; i++)
    for (slot = 0; node_alive (cluster, i) && slot < CLUSTER_SLOTS; slot++)
      if (map[slot] == (gint8) i)
        return g_strdup_printf ("redis+cluster://127.0.0.1:%u", cluster->nodes[i].port);
  g_assert_not_reached ();
}

typedef struct
{
  gint  slot;
  guint replica;
} Promotion;

static gboolean
promoted (Cluster  *cluster,
          NodeView *views,
          gpointer  data,
          GString  *why)
{
  Promotion *promotion = data;

  if (!whole (cluster, views, why))
    return FALSE;
  if (views[promotion->replica].map[promotion->slot] != (gint8) promotion->replica)
    {
      g_string_printf (why, "slot %d not served by node %u", promotion->slot, promotion->replica);
      return FALSE;
    }
  return TRUE;
}

/* The master of @key's slot, of a whole cluster, the one replica that is
 * to take its place, and (if @offset is not NULL) the master's
 * replication offset. */
static guint
promotion_of (Cluster    *cluster,
              const char *key,
              Promotion  *promotion,
              guint64    *offset)
{
  g_autoptr (GString) why = g_string_new (NULL);
  g_autofree NodeView *views = g_new0 (NodeView, CLUSTER_NODES);
  guint master, i, n_replicas = 0;

  if (!whole (cluster, views, why))
    g_error ("the cluster is not whole before its master changes: %s", why->str);
  promotion->slot = slot_of (cluster, key);
  master = (guint) views[any_node (cluster)].map[promotion->slot];
  for (i = 0; i < CLUSTER_NODES; i++)
    if (node_alive (cluster, i) && views[i].replica && views[i].master == (gint) master)
      {
        promotion->replica = i;
        n_replicas++;
      }
  g_assert_cmpuint (n_replicas, ==, 1);
  if (offset != NULL)
    *offset = views[master].offset;
  return master;
}

/* Kills with SIGKILL the master serving @key's slot, and waits until its
 * replica has taken its place: the cluster whole again, without it, and
 * the slot served by the former replica. Returns the node killed.
 * Meanwhile the nodes first go on naming the dead master for its slots
 * (CLUSTER SLOTS, MOVED); once they agree that it failed, each says
 * cluster_state:fail and refuses every command on a key, of any slot,
 * with CLUSTERDOWN, until the replica is promoted. */
guint
cluster_kill_master (Cluster    *cluster,
                     const char *key)
{
  Promotion promotion;
  guint master;
  gint64 killed;

  master = promotion_of (cluster, key, &promotion, NULL);

  server_kill (&cluster->nodes[master]);
  killed = g_get_monotonic_time ();
  wait_cluster (cluster, promoted, &promotion, "a replica to take the killed master's place");
  g_test_message ("node %u (port %u), master of slot %d, killed: node %u (port %u) serves it %.2f s later",
                  master, cluster->nodes[master].port, promotion.slot, promotion.replica,
                  cluster->nodes[promotion.replica].port, (g_get_monotonic_time () - killed) / 1e6);
  return master;
}

/* Hands the slots of @key's master over to its replica, as an operator
 * does (CLUSTER FAILOVER on the replica: nothing is lost), and waits until
 * the cluster is whole again, the old master now the replica. Returns
 * the new master. */
guint
cluster_failover (Cluster    *cluster,
                  const char *key)
{
  Promotion promotion;
  redisContext *c;
  redisReply *reply;

  promotion_of (cluster, key, &promotion, NULL);

  c = node_connect (cluster, promotion.replica);
  reply = redisCommand (c, "CLUSTER FAILOVER");
  g_assert_nonnull (reply);
  g_assert_cmpint (reply->type, ==, REDIS_REPLY_STATUS);
  freeReplyObject (reply);
  redisFree (c);
  wait_cluster (cluster, promoted, &promotion, "the replica to take its master's slots over");
  return promotion.replica;
}

/* What master_ahead() waits for: the master's replication offset past
 * @offset. */
typedef struct
{
  guint    master;
  guint64  offset;
} Ahead;

/* Looks at the master alone: its replica is frozen, and would not answer. */
static gboolean
master_ahead (Cluster  *cluster,
              NodeView *views,
              gpointer  data,
              GString  *why)
{
  Ahead *ahead = data;
  redisContext *c = node_connect (cluster, ahead->master);
  g_autofree char *replication = command_text (c, "INFO replication");
  g_autofree char *offset = info_field (replication, "master_repl_offset");
  guint64 now = offset != NULL ? g_ascii_strtoull (offset, NULL, 10) : 0;

  redisFree (c);
  g_string_printf (why, "the master's replication offset is %" G_GUINT64_FORMAT ", not past %" G_GUINT64_FORMAT,
                   now, ahead->offset);
  return now > ahead->offset;
}

/* As cluster_kill_master(), but the master dies with writes its replica
 * never got: the replica is frozen (SIGSTOP) until the master's
 * replication offset moved @bytes past the replica's (someone wrote that
 * much to it), then the master is killed and the replica let go on
 * (SIGCONT), to be promoted without those writes, as after a replication
 * lag. A frozen replica's socket still takes in what the master sends, up
 * to the kernel's buffers (megabytes on loopback): only what is past them
 * is lost. */
guint
cluster_kill_master_ahead (Cluster    *cluster,
                           const char *key,
                           guint64     bytes)
{
  Promotion promotion;
  Ahead ahead = { 0, 0 };
  pid_t replica;
  gint64 killed;

  ahead.master = promotion_of (cluster, key, &promotion, &ahead.offset);
  ahead.offset += bytes;

  server_freeze (&cluster->nodes[promotion.replica]);
  wait_cluster (cluster, master_ahead, &ahead, "writes to the master that its frozen replica misses");
  server_kill (&cluster->nodes[ahead.master]);
  killed = g_get_monotonic_time ();
  replica = (pid_t) g_ascii_strtoll (g_subprocess_get_identifier (cluster->nodes[promotion.replica].process),
                                     NULL, 10);
  g_assert_cmpint (kill (replica, SIGCONT), ==, 0);
  wait_cluster (cluster, promoted, &promotion, "a replica to take the killed master's place");
  g_test_message ("node %u (port %u), master of slot %d, killed ahead of its replica: node %u (port %u) "
                  "serves it %.2f s later", ahead.master, cluster->nodes[ahead.master].port, promotion.slot,
                  promotion.replica, cluster->nodes[promotion.replica].port,
                  (g_get_monotonic_time () - killed) / 1e6);
  return ahead.master;
}

/* ---- A queue on the cluster -------------------------------------------- */

KdRedisQueue *
cluster_open_queue (Cluster    *cluster,
                    const char *name,
                    guint       n_shards)
{
  KdRedisQueue *queue = kd_redis_queue_new (name);
  g_autofree char *url = cluster_url (cluster);
  g_autoptr (GError) error = NULL;
  gboolean set = kd_redis_queue_set_url (queue, url, &error);

  /* The error first: it says why the URL was refused. */
  g_assert_no_error (error);
  g_assert_true (set);
  kd_redis_queue_set_n_shards (queue, n_shards);
  return queue;
}

/* As produce(): @n_jobs jobs over @n_keys keys, each key's numbered from
 * 1, added to the cluster's queue @name. */
void
cluster_produce (Cluster    *cluster,
                 const char *name,
                 guint       n_shards,
                 guint       n_jobs,
                 guint       n_keys,
                 Jobs       *jobs)
{
  g_autoptr (KdRedisQueue) queue = cluster_open_queue (cluster, name, n_shards);

  produce_into (queue, n_jobs, n_keys, jobs);
}

/* As worker_start(): a worker process on the cluster's queue @name, with
 * the options after @index (NULL-terminated), logging to the cluster's
 * directory. */
Worker *
cluster_worker_start (Cluster    *cluster,
                      const char *name,
                      guint       index,
                      ...)
{
  g_autofree char *url = cluster_url (cluster);
  g_autofree char *option = g_strdup_printf ("--url=%s", url);
  const char *connection[] = { option, NULL };
  Worker *worker;
  va_list ap;

  va_start (ap, index);
  worker = worker_startv (cluster->dir, connection, name, index, ap);
  va_end (ap);
  return worker;
}

/* As a Place's locate (kd-redis-harness.h): the master serving each
 * stream's slot, as a living node says. */
static void
locate_streams (Place      *place,
                const char *name,
                guint       n_shards,
                gint       *node_of)
{
  Cluster *cluster = (Cluster *) place;   /* its first member */
  g_autofree gint8 *map = slot_map (cluster);
  redisContext *c = node_connect (cluster, any_node (cluster));
  gint shard;

  for (shard = 0; shard <= (gint) n_shards; shard++)
    {
      g_autofree char *stream = stream_name (name, shard == (gint) n_shards ? -1 : shard);

      redisAppendCommand (c, "CLUSTER KEYSLOT %s", stream);
    }
  for (shard = 0; shard <= (gint) n_shards; shard++)
    {
      redisReply *reply = NULL;

      g_assert_cmpint (redisGetReply (c, (void **) &reply), ==, REDIS_OK);
      g_assert_cmpint (reply->type, ==, REDIS_REPLY_INTEGER);
      node_of[shard] = map[reply->integer];
      g_assert_cmpint (node_of[shard], >=, 0);
      g_assert_true (node_alive (cluster, (guint) node_of[shard]));
      freeReplyObject (reply);
    }
  redisFree (c);
}

static KdRedisQueue *
place_open_queue (Place      *place,
                  const char *name,
                  guint       n_shards)
{
  return cluster_open_queue ((Cluster *) place, name, n_shards);
}
