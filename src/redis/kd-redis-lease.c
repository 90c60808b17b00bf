/* kd-redis-lease.c: the lease thread of a KdRedisQueue's consumer
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Every tick (a sixth of the lease time) the thread beats in the queue's
 * sorted set of members, computes which shards this process should own by
 * rendezvous hashing over the live members, and in one round trip renews
 * the leases it holds, releases the ones it drained and takes the ones it
 * should have. Once per lease time it also tidies the streams it reads:
 * trims them below what every consumer group has acknowledged, and
 * forgets the consumers of members gone that hold nothing. It has its own
 * connection and does nothing else, so that a renewal never waits behind a
 * read or an acknowledgement. See kd-redis-consumer.c for how it fits with
 * the other threads.
 */

#include "config.h"

#include <string.h>

#include "kd-redis-consumer-private.h"
#include "kd-redis-streams-private.h"
#include "kd-sync-private.h"

static void
fence_expired_locked (KdRedisConsumer *self,
                      gint64           now)
{
  guint i;

  for (i = 0; i < self->config.n_shards; i++)
    if (kd_redis_shard_owned (&self->shards[i]) && now >= self->shards[i].deadline)
      kd_redis_consumer_fence_locked (self, &self->shards[i]);
}

static guint64
hash64 (const char *str)
{
  guint64 hash = 14695981039346656037ull;

  for (; *str != '\0'; str++)
    {
      hash ^= (guint8) *str;
      hash *= 1099511628211ull;
    }
  return hash;
}

static guint64
mix64 (guint64 x)
{
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

/* Rendezvous hashing: shard p belongs to the live member with the highest
 * mix (member, p), so every member computes the same owners from the same
 * list, and a member joining or leaving moves only its own share. */
static void
compute_wanted (KdRedisConsumer *self,
                redisReply      *members,
                gboolean        *wanted)
{
  guint64 *hashes = g_new (guint64, members->elements);
  guint64 mine = hash64 (self->member);
  guint p;
  gsize m;

  for (m = 0; m < members->elements; m++)
    hashes[m] = members->element[m]->type == REDIS_REPLY_STRING ?
                hash64 (members->element[m]->str) : 0;

  for (p = 0; p < self->config.n_shards; p++)
    {
      guint64 salt = mix64 ((guint64) p + 1);
      guint64 best = mix64 (mine ^ salt);
      gboolean ours = TRUE;

      for (m = 0; m < members->elements && ours; m++)
        {
          guint64 score = mix64 (hashes[m] ^ salt);

          if (hashes[m] == mine)
            continue;
          if (score > best ||
              (score == best && g_strcmp0 (members->element[m]->str, self->member) > 0))
            ours = FALSE;
        }
      wanted[p] = ours;
    }

  g_free (hashes);
}

static void
add_lease_script (KdRedisArgs     *args,
                  KdRedisConsumer *self,
                  KdRedisConn     *conn,
                  KdRedisScript    script,
                  GArray          *shards)
{
  guint i;

  kd_redis_args_reset (args);
  /* Taking a lease also moves the shard's fencing token. */
  kd_redis_args_add_script (args, conn, script,
                            script == KD_REDIS_SCRIPT_ACQUIRE ? 2 * shards->len : shards->len);
  for (i = 0; i < shards->len; i++)
    kd_redis_args_add_string (args, self->shards[g_array_index (shards, guint, i)].lease);
  if (script == KD_REDIS_SCRIPT_ACQUIRE)
    for (i = 0; i < shards->len; i++)
      kd_redis_args_add_string (args, self->shards[g_array_index (shards, guint, i)].fence);
  kd_redis_args_add_string (args, self->member);
  if (script != KD_REDIS_SCRIPT_RELEASE)
    kd_redis_args_add_printf (args, "%" G_GINT64_FORMAT, self->config.lease_us / 1000);
}

/* A lease script over the shards of one group, on their node. */
typedef struct
{
  KdRedisScript  script;
  KdRedisConn   *conn;
  GArray        *shards;         /* guint: indices of the shards */
  redisReply    *reply;          /* NULL: no answer */
} LeaseCall;

static void
lease_call_clear (gpointer data)
{
  LeaseCall *call = data;

  g_array_unref (call->shards);
  g_clear_pointer (&call->reply, kd_redis_reply_free);
}

/* Appends @script over @shards, once per group (kd_redis_router_group()),
 * each on its node, to @calls. A group whose node cannot be reached is
 * left out: its shards stay as they are this round. */
static void
append_lease_calls (KdRedisConsumer *self,
                    KdRedisRouter   *router,
                    KdRedisScript    script,
                    GArray          *shards,
                    GArray          *calls)
{
  gboolean *done = g_new0 (gboolean, MAX (shards->len, 1));
  KdRedisArgs args;
  guint i, j;

  kd_redis_args_init (&args);
  for (i = 0; i < shards->len; i++)
    {
      guint slot = self->shards[g_array_index (shards, guint, i)].slot;
      guint group = kd_redis_router_group (router, slot);
      g_autoptr (GError) error = NULL;
      LeaseCall call = { script, NULL, NULL, NULL };

      if (done[i])
        continue;
      call.shards = g_array_new (FALSE, FALSE, sizeof (guint));
      for (j = i; j < shards->len; j++)
        if (!done[j] && kd_redis_router_group (router, self->shards[g_array_index (shards, guint, j)].slot) == group)
          {
            done[j] = TRUE;
            g_array_append_val (call.shards, g_array_index (shards, guint, j));
          }
      call.conn = kd_redis_router_conn (router, slot, &error);
      if (call.conn != NULL)
        {
          add_lease_script (&args, self, call.conn, script, call.shards);
          if (!kd_redis_conn_append (call.conn, &args, &error))
            call.conn = NULL;
        }
      if (call.conn == NULL)
        {
          g_debug ("redis queue %s: %s: %s", self->config.name, self->member, error->message);
          g_array_unref (call.shards);
          continue;
        }
      g_array_append_val (calls, call);
    }
  kd_redis_args_clear (&args);
  g_free (done);
}

/* Sends the calls appended and reads their replies; a node that fails
 * leaves its calls without one. */
static void
read_lease_calls (KdRedisConsumer *self,
                  KdRedisRouter   *router,
                  GArray          *calls)
{
  guint i;

  kd_redis_router_flush (router);
  for (i = 0; i < calls->len; i++)
    {
      LeaseCall *call = &g_array_index (calls, LeaseCall, i);
      g_autoptr (GError) error = NULL;

      call->reply = kd_redis_conn_read (call->conn, &error);
      if (call->reply == NULL)
        {
          g_debug ("redis queue %s: %s: %s", self->config.name, self->member, error->message);
          kd_redis_router_failed (router, call->conn);
        }
    }
}

static GArray *
lease_calls_new (void)
{
  GArray *calls = g_array_new (FALSE, FALSE, sizeof (LeaseCall));

  g_array_set_clear_func (calls, lease_call_clear);
  return calls;
}

/* One round of membership and leases: beat, compute the shards this
 * process should own, renew the leases it holds, release the ones it
 * drained, take the ones it should have. Returns the live members (for
 * lease_tidy()), or NULL if the beat failed (then the leases held are
 * renewed all the same, and none is taken). */
static GStrv
lease_tick (KdRedisConsumer *self,
            KdRedisRouter   *router)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) renew = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) release = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) acquire = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) generations = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) calls = lease_calls_new ();
  g_autoptr (GStrvBuilder) live = g_strv_builder_new ();
  gboolean *wanted, beat;
  redisReply *members = NULL;
  KdRedisConn *conn = NULL;
  KdRedisArgs args;
  gint64 sent;
  guint i, c, n_owned = 0;
  gsize m;

  kd_redis_args_init (&args);
  /* The script's hash is known once connected. */
  if (kd_redis_router_update (router, &error) &&
      (conn = kd_redis_router_conn_for (router, self->members_key, &error)) != NULL)
    {
      kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_HEARTBEAT, 1);
      kd_redis_args_add_string (&args, self->members_key);
      kd_redis_args_add_string (&args, self->member);
      kd_redis_args_add_printf (&args, "%" G_GINT64_FORMAT, self->config.lease_us / 1000);
      kd_redis_args_add_string (&args, "0");
      members = kd_redis_conn_run (conn, &args, &error);
      if (members == NULL)
        kd_redis_router_failed (router, conn);
    }
  beat = members != NULL;
  kd_redis_args_clear (&args);
  /* Without a beat on a cluster (the node of the members' set fails), the
   * leases held are still renewed, on their own nodes, as the last beat
   * wanted them, and no shard is taken; on a lone server, nothing else
   * would get through either. */
  if (members == NULL)
    {
      g_debug ("redis queue %s: %s: %s", self->config.name, self->member, error->message);
      if (!kd_redis_router_is_cluster (router))
        {
          kd_mutex_lock (&self->lock);
          fence_expired_locked (self, g_get_monotonic_time ());
          kd_mutex_unlock (&self->lock);
          return NULL;
        }
    }
  wanted = g_new0 (gboolean, self->config.n_shards);
  if (beat && members->type == REDIS_REPLY_ARRAY)
    {
      compute_wanted (self, members, wanted);
      for (m = 0; m < members->elements; m++)
        if (members->element[m]->type == REDIS_REPLY_STRING)
          g_strv_builder_add (live, members->element[m]->str);
    }
  g_clear_pointer (&members, kd_redis_reply_free);

  kd_mutex_lock (&self->lock);
  fence_expired_locked (self, g_get_monotonic_time ());
  for (i = 0; i < self->config.n_shards; i++)
    {
      KdRedisShard *shard = &self->shards[i];

      if (beat)
        shard->wanted = wanted[i] && !self->stopping;
      else
        shard->wanted = shard->wanted && !self->stopping;
      if (kd_redis_shard_owned (shard) && !shard->wanted && shard->state != KD_REDIS_SHARD_DRAINING)
        shard->state = KD_REDIS_SHARD_DRAINING;
      /* Released, or taken, only once nothing of it is in flight here, nor
       * about to be: a read under way would otherwise bring entries that
       * another member is about to claim and run too. */
      if (shard->state == KD_REDIS_SHARD_DRAINING && shard->in_flight == 0 && !shard->reading)
        g_array_append_val (release, i);
      else if (kd_redis_shard_owned (shard))
        g_array_append_val (renew, i);
      else if (beat && shard->wanted && shard->in_flight == 0 && !shard->reading && shard->unusable == NULL)
        g_array_append_val (acquire, i);
    }
  for (i = 0; i < self->config.n_shards; i++)
    g_array_append_val (generations, self->shards[i].generation);
  kd_mutex_unlock (&self->lock);
  g_free (wanted);

  sent = g_get_monotonic_time ();
  append_lease_calls (self, router, KD_REDIS_SCRIPT_RENEW, renew, calls);
  append_lease_calls (self, router, KD_REDIS_SCRIPT_RELEASE, release, calls);
  append_lease_calls (self, router, KD_REDIS_SCRIPT_ACQUIRE, acquire, calls);
  read_lease_calls (self, router, calls);

  kd_mutex_lock (&self->lock);
  for (c = 0; c < calls->len; c++)
    {
      LeaseCall *call = &g_array_index (calls, LeaseCall, c);

      if (call->reply == NULL)
        continue;
      for (i = 0; i < call->shards->len; i++)
        {
          guint index = g_array_index (call->shards, guint, i);
          KdRedisShard *shard = &self->shards[index];
          gboolean same = shard->generation == g_array_index (generations, guint, index);
          /* RENEW answers 1 or 0; ACQUIRE the shard's fencing token, or 0. */
          gboolean granted = call->script == KD_REDIS_SCRIPT_RELEASE ||
                             (call->reply->type == REDIS_REPLY_ARRAY && i < call->reply->elements &&
                              call->reply->element[i]->integer > 0);

          if (!same)
            continue;
          if (call->script == KD_REDIS_SCRIPT_RENEW)
            {
              if (!kd_redis_shard_owned (shard))
                continue;
              if (granted)
                shard->deadline = sent + self->config.lease_us - self->margin_us;
              else
                kd_redis_consumer_fence_locked (self, shard);
            }
          else if (call->script == KD_REDIS_SCRIPT_RELEASE)
            {
              if (shard->state == KD_REDIS_SHARD_DRAINING)
                kd_redis_consumer_fence_locked (self, shard);
            }
          else if (granted && shard->state == KD_REDIS_SHARD_FREE && shard->in_flight == 0 && !shard->reading &&
                   !self->stopping)
            {
              g_debug ("redis queue %s: %s took shard %d", self->config.name, self->member, index);
              shard->state = KD_REDIS_SHARD_CLAIMING;
              shard->generation++;
              shard->token = (guint64) call->reply->element[i]->integer;
              shard->deadline = sent + self->config.lease_us - self->margin_us;
              g_strlcpy (shard->cursor, "0-0", sizeof shard->cursor);
              kd_redis_consumer_wake_reader_locked (self);
            }
        }
    }
  for (i = 0; i < self->config.n_shards; i++)
    if (kd_redis_shard_owned (&self->shards[i]))
      n_owned++;
  self->stats.shards_owned = n_owned;
  kd_mutex_unlock (&self->lock);

  return beat ? g_strv_builder_end (live) : NULL;
}

/* Leaving: every lease this process holds is released at once, and it
 * leaves the members, so the others take its shards without waiting for
 * the leases to expire. */
static void
lease_leave (KdRedisConsumer *self,
             KdRedisRouter   *router)
{
  g_autoptr (GError) error = NULL;
  g_autoptr (GArray) all = g_array_new (FALSE, FALSE, sizeof (guint));
  g_autoptr (GArray) calls = lease_calls_new ();
  KdRedisConn *conn;
  KdRedisArgs args;
  redisReply *reply;
  guint i;

  kd_mutex_lock (&self->lock);
  kd_redis_consumer_fence_all_locked (self);
  kd_mutex_unlock (&self->lock);

  if (!kd_redis_router_update (router, &error))
    return;
  /* Cancelled: the reader may still wait in XREAD. */
  kd_redis_consumer_unblock_reader (self, router);

  for (i = 0; i < self->config.n_shards; i++)
    g_array_append_val (all, i);
  append_lease_calls (self, router, KD_REDIS_SCRIPT_RELEASE, all, calls);
  read_lease_calls (self, router, calls);

  conn = kd_redis_router_conn_for (router, self->members_key, &error);
  if (conn == NULL)
    return;
  kd_redis_args_init (&args);
  kd_redis_args_add_script (&args, conn, KD_REDIS_SCRIPT_HEARTBEAT, 1);
  kd_redis_args_add_string (&args, self->members_key);
  kd_redis_args_add_string (&args, self->member);
  kd_redis_args_add_string (&args, "0");
  kd_redis_args_add_string (&args, "1");
  reply = kd_redis_conn_run (conn, &args, &error);
  g_clear_pointer (&reply, kd_redis_reply_free);
  g_clear_error (&error);
  kd_redis_args_clear (&args);

  conn = kd_redis_router_conn_for (router, self->wake_key, &error);
  if (conn == NULL)
    return;
  kd_redis_args_init (&args);
  kd_redis_args_add_string (&args, "DEL");
  kd_redis_args_add_string (&args, self->wake_key);
  reply = kd_redis_conn_run (conn, &args, &error);
  g_clear_pointer (&reply, kd_redis_reply_free);
  kd_redis_args_clear (&args);
}

/* Tidies the streams of the shards this process reads, and the unkeyed
 * stream if it reads shard 0: trims them below what every consumer group
 * has acknowledged, and forgets the consumers of members gone (not among
 * @live, the members that beat within a lease) that hold nothing. Any
 * process could (only acknowledged entries, and consumers with nothing
 * pending, go): the owner does, so that each stream is tidied once per
 * round. Each slot's streams on their node. */
static void
lease_tidy (KdRedisConsumer *self,
            KdRedisRouter   *router,
            GStrv            live)
{
  g_autoptr (GPtrArray) streams = g_ptr_array_new ();
  g_autoptr (GPtrArray) argv = g_ptr_array_new_with_free_func (g_free);
  g_autoptr (GError) error = NULL;
  guint64 trimmed = 0, forgotten = 0;
  guint i;

  kd_mutex_lock (&self->lock);
  for (i = 0; i < self->config.n_shards; i++)
    if (self->shards[i].state == KD_REDIS_SHARD_READING)
      g_ptr_array_add (streams, self->shards[i].stream);
  if (self->shards[0].state == KD_REDIS_SHARD_READING)
    g_ptr_array_add (streams, self->shards[self->config.n_shards].stream);
  kd_mutex_unlock (&self->lock);
  if (streams->len == 0)
    return;

  if (!kd_redis_run_per_slot (router, KD_REDIS_SCRIPT_TRIM, streams, NULL, &trimmed, &error))
    g_debug ("redis queue %s: %s: trim: %s", self->config.name, self->member, error->message);
  kd_mutex_lock (&self->lock);
  self->stats.trimmed += trimmed;
  kd_mutex_unlock (&self->lock);
  if (error != NULL)
    return;

  /* Gone: not beating for a lease, and idle for two. */
  g_ptr_array_add (argv, g_strdup (KD_REDIS_GROUP));
  g_ptr_array_add (argv, g_strdup_printf ("%" G_GINT64_FORMAT, 2 * self->config.lease_us / 1000));
  for (i = 0; live[i] != NULL; i++)
    g_ptr_array_add (argv, g_strdup (live[i]));
  g_ptr_array_add (argv, NULL);
  if (!kd_redis_run_per_slot (router, KD_REDIS_SCRIPT_FORGET, streams, (const char * const *) argv->pdata,
                              &forgotten, &error))
    g_debug ("redis queue %s: %s: forgetting consumers: %s", self->config.name, self->member, error->message);
}

/* The lease thread's loop ends when stop() or a cancellation says so, or
 * once the reader exited (the dispatcher was closed without a stop) and
 * everything in flight here has ended and been acknowledged. */
static gboolean
lease_done_locked (KdRedisConsumer *self)
{
  return self->releasing || self->cancelled || (self->reader_done && self->in_flight == 0);
}

gpointer
kd_redis_lease_main (gpointer data)
{
  KdRedisConsumer *self = data;
  /* The first round takes the shards; tidying waits for the next. */
  gint64 next_tidy = g_get_monotonic_time () + self->tick_us;
  KdRedisRouter router;

  kd_redis_router_init (&router, &self->config.server, self->config.lease_us);
  kd_redis_router_set_name (&router, self->config.name, "lease", self->member);

  kd_mutex_lock (&self->lock);
  while (!lease_done_locked (self))
    {
      /* Ticks from the start of each, whatever the round trips took. */
      gint64 now = g_get_monotonic_time ();
      gint64 next_tick = now + self->tick_us;
      g_auto (GStrv) live = NULL;

      kd_mutex_unlock (&self->lock);
      live = lease_tick (self, &router);
      kd_redis_consumer_unblock_reader (self, &router);
      if (now >= next_tidy && live != NULL)
        {
          lease_tidy (self, &router, live);
          next_tidy = now + self->config.lease_us;
        }
      kd_mutex_lock (&self->lock);
      while (!lease_done_locked (self))
        if (!kd_cond_wait_until (&self->lease_cond, &self->lock, next_tick))
          break;
    }
  kd_mutex_unlock (&self->lock);

  lease_leave (self, &router);
  kd_redis_router_clear (&router);

  return NULL;
}
