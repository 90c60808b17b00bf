/* kd-dispatcher-keys.c: a dispatcher's keys: their states, idle spells and bound
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * Key states (kd_dispatcher_set_key_state_funcs()) are the actor's memory
 * of a key. The runner of a key's first job makes it (in run_job()) and
 * keeps it in the key's mailbox; when the mailbox runs empty its runner
 * frees it (kd_dispatcher_end_key_state()), before the mailbox can be
 * reaped, so a key never has two states.
 *
 * With an idle time (kd_dispatcher_set_key_idle_time()) the reaped mailbox
 * keeps its state instead, for the key's next job: an idle spell. One call
 * in the timer, the idle keys' sweep, ends the spells as they come due
 * and comes back for the next one; one such call is pending
 * whenever a key is idle (@sweep_armed). The key table bounds how many
 * keys are idle at once (kd_dispatcher_set_max_idle_keys()): the runner
 * that passes the bound ends the oldest spell of its shard itself
 * (kd_dispatcher_end_idle_spell(); see kd-key-table.c). Once the
 * dispatcher is stopped or cancelled, the sweep ends every spell.
 *
 * A per-key bound (kd_dispatcher_set_key_capacity()) is checked after the
 * unit of admission was taken: the key table counts each key's jobs and a
 * submit waits on its shard's condition until its key has room, or gives
 * the unit back if it gives up (see kd-key-table.c).
 */

#include "config.h"

#include "kd-dispatcher-internal.h"

/* By the runner of @mailbox, which has a key state: if the key has no job
 * left, frees its state, before the mailbox can be reaped and revived by a
 * producer, so a key never has two states. A job that arrives meanwhile
 * runs with a new one. */
void
kd_dispatcher_end_key_state (KdDispatcher *self,
                             KdMailbox    *mailbox)
{
  gpointer state;

  if (!kd_key_table_is_empty (self->keys, mailbox))
    return;

  state = g_steal_pointer (&mailbox->state);
  mailbox->has_state = FALSE;
  if (self->key_state_free != NULL)
    self->key_state_free (state);
}

/* How many idle spells the sweep ends per look at the key table. */
#define EXPIRE_BATCH 64

/* Ends the idle spell the key table handed out (by the sweep, or early by
 * the bound on idle keys): frees its @state, then lets the mailbox go on. */
void
kd_dispatcher_end_idle_spell (KdDispatcher *self,
                              KdMailbox    *mailbox,
                              gpointer      state)
{
  if (self->key_state_free != NULL)
    self->key_state_free (state);
  kd_key_table_expire_end (self->keys, mailbox);
}

/* Frees the states of the idle spells of the keys reaped before
 * @reaped_before. */
static void
expire_idle_states (KdDispatcher *self,
                    gint64        reaped_before)
{
  KdMailbox *mailboxes[EXPIRE_BATCH];
  gpointer states[EXPIRE_BATCH];
  guint n, i;

  do
    {
      n = kd_key_table_take_expired (self->keys, reaped_before, mailboxes, states, EXPIRE_BATCH);
      for (i = 0; i < n; i++)
        kd_dispatcher_end_idle_spell (self, mailboxes[i], states[i]);
    }
  while (n == EXPIRE_BATCH);
}

/* On the timer's thread, while keys are idle: ends the idle spells that
 * are due (all of them once the dispatcher is cancelled or stopped), then
 * comes back when the next one is. One such call is pending whenever a key
 * is idle (@sweep_armed). */
static void
sweep_idle_keys (gpointer owner,
                 gpointer data)
{
  KdDispatcher *self = owner;
  KdScheduler *scheduler = data;
  gboolean all = g_atomic_int_get (&self->stopped) || g_cancellable_is_cancelled (self->cancellable);
  gint64 now = g_get_monotonic_time ();
  gint64 oldest;

  expire_idle_states (self, all ? G_MAXINT64 : now - self->key_idle_us + 1);
  kd_dispatcher_counters_changed (self);

  oldest = kd_key_table_oldest_idle (self->keys);
  if (oldest == G_MAXINT64)
    {
      /* A key made idle meanwhile either found the sweep armed and left
       * its spell to it, or finds it disarmed now and arms it: look once
       * more after disarming (the shard locks order the two). */
      __atomic_store_n (&self->sweep_armed, FALSE, __ATOMIC_SEQ_CST);
      oldest = kd_key_table_oldest_idle (self->keys);
      if (oldest == G_MAXINT64 || __atomic_exchange_n (&self->sweep_armed, TRUE, __ATOMIC_SEQ_CST))
        return;
    }
  /* The scheduler may have shut down since the look at @stopped: nothing
   * is pending any more, so every spell ends now. */
  if (!kd_scheduler_call_at (scheduler, all ? now : kd_time_after (oldest, self->key_idle_us),
                             sweep_idle_keys, self, scheduler))
    expire_idle_states (self, G_MAXINT64);
}

/* After a key was made idle: the sweep comes when its spell is due, unless
 * it is already armed (for an earlier spell). */
void
kd_dispatcher_arm_idle_sweep (KdDispatcher *self,
                              KdScheduler  *scheduler)
{
  /* From a worker that still holds a unit of admission, so the scheduler
   * has not shut down. */
  if (!__atomic_load_n (&self->sweep_armed, __ATOMIC_RELAXED) &&
      !__atomic_exchange_n (&self->sweep_armed, TRUE, __ATOMIC_SEQ_CST) &&
      !kd_scheduler_call_at (scheduler, kd_due_time_after (self->key_idle_us), sweep_idle_keys, self,
                             scheduler))
    g_assert_not_reached ();
}

/**
 * kd_dispatcher_set_key_state_funcs:
 * @self: a dispatcher
 * @state_new: (nullable) (scope notified) (closure user_data) (destroy user_data_free):
 *   creates a key's state
 * @state_free: (nullable) (scope forever): frees a
 *   state @state_new made
 * @user_data: data for @state_new
 * @user_data_free: (nullable): frees @user_data once the dispatcher is
 *   finalized
 *
 * Gives each key an actor state: @state_new makes it on the worker about to
 * run the key's first job, handlers of the key get it with
 * kd_job_get_key_state() and use it without locks (a key's jobs run one at
 * a time), and @state_free frees it on the worker that ran the key's last
 * job, once the key has no job left (a parked key's, see %KD_FAILURE_PARK,
 * on the thread that resumes, drops or cancels it or drops the last
 * reference; an idle key's on the dispatcher's timer thread, or on a worker
 * when the bound on idle keys ends its idle time early, see
 * kd_dispatcher_set_key_idle_time()). @state_free
 * must not wait for the dispatcher. A key has at most one state at a time:
 * the next job of a key whose state was freed gets a new one. Jobs that
 * never run (cancelled) make no state. Every state is freed before
 * kd_dispatcher_wait() returns for the jobs that used it, unless an idle
 * time keeps it longer (kd_dispatcher_set_key_idle_time()).
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_key_state_funcs (KdDispatcher      *self,
                                   KdKeyStateNewFunc  state_new,
                                   GDestroyNotify     state_free,
                                   gpointer           user_data,
                                   GDestroyNotify     user_data_free)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  if (self->key_state_data_free != NULL)
    self->key_state_data_free (self->key_state_data);

  self->key_state_new = state_new;
  self->key_state_free = state_free;
  self->key_state_data = user_data;
  self->key_state_data_free = user_data_free;
}

/**
 * kd_dispatcher_set_key_capacity:
 * @self: a dispatcher
 * @capacity: the most pending jobs one key may have; 0 for no such bound
 *
 * Bounds each key's pending jobs (queued, waiting for a retry, parked or
 * running), so that one flooding client cannot take the whole bound of the
 * dispatcher (kd_dispatcher_set_capacity()) from the others. A submit to a
 * key at its bound behaves as at the dispatcher's bound:
 * kd_dispatcher_submit() blocks until one of the key's jobs ended,
 * kd_dispatcher_try_submit() fails with %KD_ERROR_FULL,
 * kd_dispatcher_submit_timeout() fails with %KD_ERROR_TIMEOUT at its
 * deadline, and closing the dispatcher refuses blocked submits with
 * %KD_ERROR_CLOSED; the item stays the caller's. A submit blocked on its
 * key holds one unit of the dispatcher's bound meanwhile (it counts as
 * pending, and kd_dispatcher_wait() called meanwhile waits for it), so a
 * key holds at most @capacity units plus one per thread blocked on it.
 * kd_dispatcher_submit_async() does not wait for a key: a submission to a
 * key at its bound is refused with %KD_ERROR_FULL. Jobs that a pipeline's
 * stage emits into the next are not bounded per key.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_key_capacity (KdDispatcher *self,
                                guint         capacity)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  self->key_capacity = capacity;
}

/**
 * kd_dispatcher_get_key_capacity:
 * @self: a dispatcher
 *
 * Gets the bound on each key's pending jobs.
 *
 * Returns: the most pending jobs one key may have; 0 for no such bound
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_key_capacity (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->key_capacity;
}

/**
 * kd_dispatcher_set_key_idle_time:
 * @self: a dispatcher
 * @idle_us: how long a key keeps its state after its last job, in
 *   microseconds; 0 to free it at once
 *
 * Lets a key's actor state (kd_dispatcher_set_key_state_funcs()) outlive
 * the key's last job for @idle_us: a job of the key that arrives within
 * that time finds the same state, so a client that sends one message at a
 * time does not pay for a new state each time. Once the key stayed idle for
 * @idle_us its state is freed, on the dispatcher's timer thread. The state
 * is still used by one job at a time, without locks.
 *
 * With an idle time, states outlive kd_dispatcher_wait() (an idle key is
 * not counted in live-keys, but in #KdDispatcher:idle-keys); every one left
 * is freed when the dispatcher stops (when it is closed and its jobs ended,
 * so before wait() returns on a closed dispatcher and before the last unref
 * returns) or is cancelled.
 *
 * However fast keys come and go, at most kd_dispatcher_set_max_idle_keys()
 * of them keep their state at once: past that bound, the worker that makes
 * one more key idle frees the state of the least recently idle key of its
 * shard of the key table (keys spread evenly over 32 shards, so this is
 * about the least recently idle key of all) before it goes on. The timer
 * thread ends the idle spells that are due at a cost per key that does not
 * depend on how many are idle.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_key_idle_time (KdDispatcher *self,
                                 gint64        idle_us)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (idle_us >= 0);

  if (!kd_dispatcher_check_configurable (self, G_STRFUNC))
    return;

  self->key_idle_us = idle_us;
}

/**
 * kd_dispatcher_set_max_idle_keys:
 * @self: a dispatcher
 * @max_keys: the most keys that keep their state while idle, from 1 to
 *   %G_MAXINT32
 *
 * Bounds the keys whose state outlives their last job for the idle time
 * (kd_dispatcher_set_key_idle_time()): past the bound, the least recently
 * idle state is freed early. The default is 65,536.
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_max_idle_keys (KdDispatcher *self,
                                 guint         max_keys)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (max_keys >= 1 && max_keys <= G_MAXINT32);

  if (kd_dispatcher_check_configurable (self, G_STRFUNC) && self->max_idle_keys != max_keys)
    {
      self->max_idle_keys = max_keys;
      g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_MAX_IDLE_KEYS]);
    }
}

/**
 * kd_dispatcher_get_max_idle_keys:
 * @self: a dispatcher
 *
 * Gets the bound on idle keys (see kd_dispatcher_set_max_idle_keys()).
 *
 * Returns: the most keys that keep their state while idle
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_max_idle_keys (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->max_idle_keys;
}
