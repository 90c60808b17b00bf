/* kd-dispatcher-async.c: submitting and waiting from a main loop, without blocking
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * kd_dispatcher_submit_async() never blocks. A submission that finds room
 * goes in at once, as any submit. One that finds the bound reached joins
 * the @waiting FIFO (at most max-waiting of them; one more is refused with
 * KD_ERROR_FULL), and whoever releases a unit while submissions wait
 * (release_unit() in kd-dispatcher.c) admits them in call order
 * (kd_dispatcher_admit_waiting()), queueing each job under @async_lock so
 * that a key's jobs keep their call order. A submission that finds others
 * waiting queues behind them even if there is room, for the same reason.
 *
 * Each submission holds a KdSubmitResult (and through it the dispatcher)
 * until its callback ran: when its job ended, after the done callback and
 * item-free, or when it was refused, the result goes through the delivery
 * of the caller's thread-default context (the dispatcher's
 * KdResultRegistry, see kd-submit-result.c), which runs the callback
 * there. Closing refuses the waiting ones with KD_ERROR_CLOSED.
 *
 * kd_dispatcher_wait_async() is the barrier without a thread: it seals an
 * epoch of the admission as kd_dispatcher_wait() does, and registers a
 * KdDrainWaiter that the release draining that epoch calls, on whichever
 * thread sees it drain (kd_admission_wait_async()), under no lock. Its result is a KdSubmitResult without a
 * job, delivered like a submission's, in the caller's context, never
 * from the releasing thread (a release may run in that context, under
 * @async_lock). An AsyncWait is shared by the call that set it up, the
 * waiter and the cancellable's watch; whichever of the drain and the
 * cancellation takes the result first completes it, once. A cancelled
 * waiter stays registered until its epoch drains (at the latest when the
 * dispatcher shuts down): cancelling touches only the AsyncWait.
 */

#include "config.h"

#include "kd-dispatcher-internal.h"
#include "kd-error.h"

/* A submission that was never accepted: its callback sees @error
 * (transfer full; NULL for KD_ERROR_CLOSED) and the item is still the
 * caller's. It counts as refused in its group too. */
static void
refuse_result (KdDispatcher   *self,
               KdSubmitResult *result,
               GError         *error)
{
  KdGroup *group = kd_submit_result_get_group (result);

  kd_dispatcher_count_rejected (self);
  kd_submit_result_refuse_item (result);
  if (group != NULL)
    kd_group_state_count_rejected (kd_group_get_state (group));
  if (error == NULL)
    error = g_error_new_literal (KD_ERROR, KD_ERROR_CLOSED,
                                 "The dispatcher was closed before the submission was accepted");
  kd_submit_result_complete (result, error);
}

/* The state of the group a submission was made through, or NULL. */
static KdGroupState *
result_group_state (KdSubmitResult *result)
{
  KdGroup *group = kd_submit_result_get_group (result);

  return group != NULL ? kd_group_get_state (group) : NULL;
}

/* With @async_lock held: admits waiting submissions, first come first
 * served, while there is room. Admitting and queueing under the lock keeps
 * them in call order, hence a key's jobs in order. Once the dispatcher is
 * closed, refuses them all. A submission refused because its key is full
 * leaves its unit in @unreleased (a count per epoch), which the caller
 * releases once it let go of the lock: a release may end a barrier's epoch
 * and complete an async wait. */
static void
admit_waiting_locked (KdDispatcher *self,
                      guint        *unreleased)
{
  while (self->waiting.length > 0)
    {
      KdSubmitResult *result = kd_submit_result_from_task (self->waiting.head);
      const char *key;
      GError *error = NULL;
      KdKeyBound bound;
      KdTask *last;
      guint epoch, n;

      if (!kd_admission_acquire (&self->admission, KD_ADMIT_TRY, 0, &epoch, NULL))
        {
          if (!kd_admission_is_closed (&self->admission))
            return;

          while (self->waiting.length > 0)
            {
              result = kd_submit_result_from_task (kd_task_list_take (&self->waiting, 1,
                                                                      &n, &last));
              refuse_result (self, result, NULL);
            }
          __atomic_store_n (&self->n_waiting, 0, __ATOMIC_SEQ_CST);
          return;
        }

      /* Counted as waiting until queued: a submission made meanwhile by
       * the thread that made this one must not overtake it. */
      kd_task_list_take (&self->waiting, 1, &n, &last);
      key = kd_submit_result_get_key (result);
      if (!kd_dispatcher_push_job (self, key, NULL, NULL, result, result_group_state (result),
                                   kd_submit_result_get_item (result),
                                   kd_submit_result_get_item_kind (result), epoch,
                                   kd_dispatcher_key_bound (self, key, KD_ADMIT_TRY, 0, &bound),
                                   &error))
        {
          /* Its key is full. */
          unreleased[epoch]++;
          refuse_result (self, result, g_steal_pointer (&error));
        }
      __atomic_sub_fetch (&self->n_waiting, 1, __ATOMIC_SEQ_CST);
    }
}

/* Releases what admit_waiting_locked() left in @unreleased. */
static void
release_unreleased (KdDispatcher *self,
                    const guint  *unreleased)
{
  guint epoch, i;

  for (epoch = 0; epoch < KD_ADMISSION_EPOCHS; epoch++)
    for (i = 0; i < unreleased[epoch]; i++)
      kd_dispatcher_release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
}

void
kd_dispatcher_admit_waiting (KdDispatcher *self)
{
  guint unreleased[KD_ADMISSION_EPOCHS] = { 0 };

  kd_mutex_lock (&self->async_lock);
  admit_waiting_locked (self, unreleased);
  kd_mutex_unlock (&self->async_lock);
  release_unreleased (self, unreleased);
}

void
kd_dispatcher_refuse_waiting (KdDispatcher *self)
{
  if (__atomic_load_n (&self->n_waiting, __ATOMIC_SEQ_CST) > 0)
    kd_dispatcher_admit_waiting (self);
}

/**
 * kd_dispatcher_set_max_waiting:
 * @self: a dispatcher
 * @max_waiting: the most async submissions that may wait for room, from 1
 *   to %G_MAXINT32
 *
 * Bounds the async submissions (kd_dispatcher_submit_async()) that wait
 * for room while the dispatcher is at its bound. One more is refused: its
 * callback, in a later iteration of the caller's context, gets
 * %KD_ERROR_FULL, and its item is still the caller's. The default is the
 * capacity (kd_dispatcher_set_capacity()).
 *
 * Call before the first submit, from the thread that configures the
 * dispatcher.
 *
 * Since: 0.1
 */
void
kd_dispatcher_set_max_waiting (KdDispatcher *self,
                               guint         max_waiting)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (max_waiting >= 1 && max_waiting <= G_MAXINT32);

  if (kd_dispatcher_check_configurable (self, G_STRFUNC) && self->max_waiting != max_waiting)
    {
      self->max_waiting = max_waiting;
      g_object_notify_by_pspec (G_OBJECT (self), kd_dispatcher_properties[PROP_MAX_WAITING]);
    }
}

/**
 * kd_dispatcher_get_max_waiting:
 * @self: a dispatcher
 *
 * Gets the bound on async submissions waiting for room (see
 * kd_dispatcher_set_max_waiting()).
 *
 * Returns: the most async submissions that may wait
 *
 * Since: 0.1
 */
guint
kd_dispatcher_get_max_waiting (KdDispatcher *self)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), 0);

  return self->max_waiting != 0 ? self->max_waiting : self->admission.capacity;
}

/* kd_dispatcher_submit_async() and a group's: admits @result's submission
 * at once, or queues it behind those waiting for room, or refuses it. */
static void
submit_async (KdDispatcher   *self,
              const char     *key,
              gpointer        item,
              KdSubmitResult *result)
{
  GError *error = NULL;
  guint unreleased[KD_ADMISSION_EPOCHS] = { 0 };
  guint epoch;

  if (G_UNLIKELY (!kd_dispatcher_ensure_started (self, &error)))
    {
      refuse_result (self, result, g_steal_pointer (&error));
      return;
    }

  /* Nobody waits: straight in if there is room. */
  kd_dispatcher_refuse_if_cancelled (self);
  if (__atomic_load_n (&self->n_waiting, __ATOMIC_SEQ_CST) == 0)
    {
      if (kd_admission_acquire (&self->admission, KD_ADMIT_TRY, 0, &epoch, NULL))
        {
          KdKeyBound bound;

          /* A full key does not wait: the submission is refused. */
          if (!kd_dispatcher_push_job (self, key, NULL, NULL, result, result_group_state (result),
                                       item, kd_submit_result_get_item_kind (result), epoch,
                                       kd_dispatcher_key_bound (self, key, KD_ADMIT_TRY, 0, &bound),
                                       &error))
            {
              kd_dispatcher_release_unit (self, KD_ADMISSION_ANY_RELEASER, epoch);
              refuse_result (self, result, g_steal_pointer (&error));
            }
          return;
        }
      if (kd_admission_is_closed (&self->admission))
        {
          refuse_result (self, result, NULL);
          return;
        }
    }

  /* Behind those who wait, if there is room among them. Counted before
   * looking for room again: a unit released meanwhile either is seen here
   * or sees this submission (see kd_dispatcher_release_unit()). */
  kd_submit_result_keep_key (result, key);
  kd_mutex_lock (&self->async_lock);
  if (self->waiting.length >= kd_dispatcher_get_max_waiting (self))
    {
      kd_mutex_unlock (&self->async_lock);
      /* Closed before full, as for any submit. */
      refuse_result (self, result,
                     kd_admission_is_closed (&self->admission)
                       ? NULL
                       : g_error_new (KD_ERROR, KD_ERROR_FULL,
                                      "%u async submissions already wait for room (see "
                                      "kd_dispatcher_set_max_waiting())",
                                      kd_dispatcher_get_max_waiting (self)));
      return;
    }
  kd_task_list_push (&self->waiting, kd_submit_result_get_task (result));
  __atomic_add_fetch (&self->n_waiting, 1, __ATOMIC_SEQ_CST);
  admit_waiting_locked (self, unreleased);
  kd_mutex_unlock (&self->async_lock);
  release_unreleased (self, unreleased);
  kd_dispatcher_counters_changed (self);
}

/**
 * kd_dispatcher_submit_async:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @cancellable: (nullable): cancels this submission until its job starts
 * @callback: (scope async) (nullable) (closure user_data): called once the
 *   job has ended, or the submission was refused
 * @user_data: data for @callback
 *
 * Submits a job without ever blocking the calling thread. If the dispatcher
 * is at its bound, the submission waits, without a thread, and is accepted
 * when room frees, after the async submissions made before it; if
 * kd_dispatcher_get_max_waiting() submissions already wait, it is refused
 * with %KD_ERROR_FULL (see kd_dispatcher_set_max_waiting()).
 *
 * @callback runs in the thread-default main context of the calling thread
 * (see g_main_context_push_thread_default()), in a later iteration, never
 * from inside this call. It runs once the job has ended (after the done
 * callback and the item-free function), so for the submissions of one key
 * made from one thread the callbacks come in submission order. Call
 * kd_dispatcher_submit_finish() from it to learn how the job ended.
 *
 * Cancelling @cancellable before the job starts ends the job with
 * %G_IO_ERROR_CANCELLED without running it: it still takes its turn in its
 * key's order (a waiting submission is accepted first), and ends through
 * the done callback and item-free function like any job.
 *
 * If the dispatcher is closed (or cancelled) before the submission was
 * accepted, it is refused with %KD_ERROR_CLOSED: no job was created and
 * @item is still the caller's. A refusal comes through @callback too, in a
 * later iteration: until then, like every call whose callback has not run,
 * it holds a small record (not the item) and a reference to the
 * dispatcher.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_dispatcher_submit_async (KdDispatcher        *self,
                            const char          *key,
                            gpointer             item,
                            GCancellable        *cancellable,
                            GAsyncReadyCallback  callback,
                            gpointer             user_data)
{
  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (self->handler != NULL);
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  submit_async (self, key, item,
                kd_submit_result_new (self, self->results, KD_SUBMIT_RESULT_TAG, item, cancellable,
                                      callback, user_data));
}

/**
 * kd_dispatcher_submit_value_async:
 * @self: a dispatcher
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @value: the job's item: any #GValue, copied
 * @cancellable: (nullable): cancels this submission until its job starts
 * @callback: (scope async) (nullable) (closure user_data): called once the
 *   job has ended, or the submission was refused
 * @user_data: data for @callback
 *
 * Like kd_dispatcher_submit_async(), with a value for the item, as
 * kd_dispatcher_submit_value(): the job holds a copy of @value, freed by
 * the dispatcher once the job ended, or once the submission was refused.
 * Call kd_dispatcher_submit_value_finish() (or kd_dispatcher_submit_finish(),
 * the same) from @callback.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_dispatcher_submit_value_async (KdDispatcher        *self,
                                  const char          *key,
                                  const GValue        *value,
                                  GCancellable        *cancellable,
                                  GAsyncReadyCallback  callback,
                                  gpointer             user_data)
{
  KdSubmitResult *result;
  GValue *item;

  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (self->handler != NULL);
  g_return_if_fail (G_IS_VALUE (value));
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  item = kd_item_new_value (value);
  result = kd_submit_result_new (self, self->results, KD_SUBMIT_RESULT_TAG, item, cancellable,
                                 callback, user_data);
  kd_submit_result_set_value_item (result);
  submit_async (self, key, item, result);
}

/* A result for a call made on @group, delivered through the dispatcher's
 * registry (so a group's results and the dispatcher's share their
 * caller's FIFO). */
KdSubmitResult *
kd_dispatcher_new_group_result (KdDispatcher        *self,
                                KdGroup             *group,
                                gpointer             source_tag,
                                gpointer             item,
                                GCancellable        *cancellable,
                                GAsyncReadyCallback  callback,
                                gpointer             user_data)
{
  KdSubmitResult *result = kd_submit_result_new (self, self->results, source_tag, item, cancellable,
                                                 callback, user_data);

  kd_submit_result_set_group (result, group);
  return result;
}

/* kd_group_submit_async(): a submission whose job is @group's. A
 * cancelled group refuses it, counted as any refusal. */
void
kd_dispatcher_submit_async_in_group (KdDispatcher        *self,
                                     KdGroup             *group,
                                     const char          *key,
                                     gpointer             item,
                                     KdItemKind           item_kind,
                                     GCancellable        *cancellable,
                                     GAsyncReadyCallback  callback,
                                     gpointer             user_data)
{
  KdSubmitResult *result;
  GError *error = NULL;

  g_return_if_fail (self->handler != NULL);

  result = kd_dispatcher_new_group_result (self, group, KD_GROUP_SUBMIT_TAG, item, cancellable,
                                           callback, user_data);
  if (item_kind == KD_ITEM_VALUE)
    kd_submit_result_set_value_item (result);
  if (!kd_group_state_check_open (kd_group_get_state (group), &error))
    refuse_result (self, result, g_steal_pointer (&error));
  else
    submit_async (self, key, item, result);
}

/**
 * kd_dispatcher_submit_finish:
 * @self: a dispatcher
 * @result: the #GAsyncResult given to the callback of
 *   kd_dispatcher_submit_async()
 * @error: return location for a #GError
 *
 * Tells how an async submission ended: %TRUE if its handler completed;
 * %FALSE with the handler's error if it failed, %G_IO_ERROR_CANCELLED if the
 * job ended without running (the submission's or the dispatcher's
 * cancellable), or %KD_ERROR_CLOSED if the submission was never accepted
 * (the item then still belongs to the caller).
 *
 * Returns: %TRUE if the job ran and completed
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_finish (KdDispatcher  *self,
                             GAsyncResult  *result,
                             GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (KD_IS_SUBMIT_RESULT (result), FALSE);
  g_return_val_if_fail (g_async_result_is_tagged (result, KD_SUBMIT_RESULT_TAG), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_submit_result_propagate (KD_SUBMIT_RESULT (result), error);
}

/**
 * kd_dispatcher_submit_value_finish:
 * @self: a dispatcher
 * @result: the #GAsyncResult given to the callback of
 *   kd_dispatcher_submit_value_async()
 * @error: return location for a #GError
 *
 * Tells how a value submission ended, as kd_dispatcher_submit_finish().
 *
 * Returns: %TRUE if the job's handler completed
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_submit_value_finish (KdDispatcher  *self,
                                   GAsyncResult  *result,
                                   GError       **error)
{
  return kd_dispatcher_submit_finish (self, result, error);
}

/* The source tag of kd_dispatcher_wait_async()'s results. */
#define ASYNC_WAIT_TAG ((gpointer) (guintptr) kd_dispatcher_wait_async)

/* A kd_dispatcher_wait_async() in progress. */
typedef struct
{
  KdDrainWaiter   waiter;
  gint            ref_count;   /* the setup's, and the waiter's until it is called */
  KdSubmitResult *result;      /* until completed, by whoever takes it */
  KdCancelWatch  *watch;       /* NULL without a cancellable */
} AsyncWait;

static void
async_wait_unref (AsyncWait *wait)
{
  if (!g_atomic_int_dec_and_test (&wait->ref_count))
    return;

  /* Not in a cancel call on another thread once this returns. */
  g_clear_pointer (&wait->watch, kd_cancel_watch_free);
  g_free (wait);
}

/* The waiter's epoch drained: on the thread that saw it drain. The result
 * goes through the delivery of the caller's context, never straight from
 * here (a release may run in that context, under @async_lock). */
static void
async_wait_drained (gpointer user_data)
{
  AsyncWait *wait = user_data;

  kd_submit_result_complete_once (&wait->result, NULL);
  async_wait_unref (wait);
}

/* The cancellable's watch. The waiter stays registered until its epoch
 * drains (touching only @wait, which lives until then), so that this
 * touches neither the admission nor the dispatcher, whose last reference
 * the delivered result may drop. */
static void
async_wait_cancelled (gpointer user_data)
{
  AsyncWait *wait = user_data;

  kd_submit_result_complete_once (&wait->result,
                                  g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                                       "The wait was cancelled"));
}

/**
 * kd_dispatcher_wait_async:
 * @self: a dispatcher
 * @cancellable: (nullable): stops waiting (the jobs are not touched)
 * @callback: (scope async) (closure user_data): called in the caller's
 *   thread-default main context once every job accepted before the call
 *   has ended
 * @user_data: data for @callback
 *
 * The barrier of kd_dispatcher_wait() without blocking: @callback runs in
 * the thread-default main context of the caller once every job accepted
 * before the call has ended (their done callbacks and item-free functions
 * ran; with a main context, their handlers returned). Jobs accepted during
 * or after the call do not delay it, as long as fewer than 31 waits of
 * this dispatcher (of any kind) are outstanding at once; beyond that, a
 * wait also covers the jobs accepted until an older wait's jobs ended.
 * Finish with kd_dispatcher_wait_finish().
 *
 * Cancelling @cancellable before then completes the wait at once with
 * %G_IO_ERROR_CANCELLED; the jobs go on as before. Unlike
 * kd_dispatcher_wait(), it does not join the worker threads of a closed
 * dispatcher (they exit by themselves once it drained), and it may be
 * called from anywhere, the dispatcher's own handlers included.
 *
 * Holds a reference to @self until @callback ran.
 *
 * Since: 0.1
 */
void
kd_dispatcher_wait_async (KdDispatcher        *self,
                          GCancellable        *cancellable,
                          GAsyncReadyCallback  callback,
                          gpointer             user_data)
{
  AsyncWait *wait;

  g_return_if_fail (KD_IS_DISPATCHER (self));
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  wait = g_new0 (AsyncWait, 1);
  wait->result = kd_submit_result_new (self, self->results, ASYNC_WAIT_TAG, NULL, NULL,
                                       callback, user_data);
  wait->waiter.func = async_wait_drained;
  wait->waiter.user_data = wait;
  wait->ref_count = 2;

  if (!kd_admission_wait_async (&self->admission, &wait->waiter))
    {
      /* Drained already, and never registered: nobody else has it. */
      kd_submit_result_complete (g_steal_pointer (&wait->result), NULL);
      g_free (wait);
      return;
    }

  if (cancellable != NULL)
    wait->watch = kd_cancel_watch_new (cancellable, async_wait_cancelled, wait);
  async_wait_unref (wait);
}

/**
 * kd_dispatcher_wait_finish:
 * @self: a dispatcher
 * @result: the #GAsyncResult given to the callback of
 *   kd_dispatcher_wait_async()
 * @error: return location for a #GError
 *
 * Tells how an async wait ended.
 *
 * Returns: %TRUE once every job it waited for had ended; %FALSE with
 *   %G_IO_ERROR_CANCELLED if it was cancelled first
 *
 * Since: 0.1
 */
gboolean
kd_dispatcher_wait_finish (KdDispatcher  *self,
                           GAsyncResult  *result,
                           GError       **error)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (self), FALSE);
  g_return_val_if_fail (KD_IS_SUBMIT_RESULT (result), FALSE);
  g_return_val_if_fail (g_async_result_is_tagged (result, ASYNC_WAIT_TAG), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_submit_result_propagate (KD_SUBMIT_RESULT (result), error);
}
