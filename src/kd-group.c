/* kd-group.c: jobs counted, awaited and cancelled together
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A KdGroup is a window on a dispatcher: the jobs submitted through it are
 * the dispatcher's jobs in every way (its bound, its per-key order, its
 * cancellation, its counters), and the group keeps what concerns them
 * alone: their counters, their barrier, their first error and a
 * cancellable of their own.
 *
 * What the jobs share with the group is its KdGroupState (the counters,
 * the barrier, the first error, the cancellable); the KdGroup object adds
 * the reference to the dispatcher and the API. Each job of the group holds
 * a reference to the state, not to the group, from the moment it is about
 * to be queued (kd_group_state_enter()) until its record is freed, after
 * its done callback (which may run later in a main context, and may look
 * at the group's cancellable). It counts as pending in the group until it
 * ended (kd_group_state_job_ended(), called by the worker that ended it,
 * as the dispatcher releases its unit: after its done callback and
 * item-free ran, or, with a main context, once its handler returned) or
 * turned out never to be queued (kd_group_state_unqueued(): its key gave
 * up waiting for room). So the group, and the dispatcher's reference it
 * holds, go where the application drops them, never implicitly on a
 * worker as a job ends: the dispatcher's last unref, which waits for its
 * jobs and runs its destroy notifies, stays where the application makes
 * it. @pending counts the jobs. The dispatcher's worker asks
 * kd_group_state_is_cancelled() before it runs a job of the group: once the
 * group's cancellable is cancelled, by the application or by the first
 * failure of a fail-fast group, its jobs that have not started end
 * cancelled as workers reach them, in their keys' order, through the done
 * callback, like the jobs of a cancelled dispatcher; submits through the
 * group are refused.
 *
 * The barrier: whenever @pending falls to zero the group has drained, and
 * @generation counts the drains. A wait returns at the first drain after
 * its call (or at once if nothing is pending): by then every job submitted
 * through the group before the call has ended. Blocking waits sleep on
 * @drained; an async wait is a GroupWait in @waits, whose result (a
 * KdSubmitResult, delivered in the caller's context after the callbacks of
 * the group's async submissions made there before it) the drain completes.
 * A wait's cancellable completes it at once and takes it out of @waits, so
 * cancelled waits do not pile up while the group stays busy.
 *
 * Every wait reports the group's first error: the error of the first of
 * its jobs to end failed or cancelled, copied when it ended and kept for
 * the group's life (a group is cheap: one per batch or request).
 *
 * Locks. @lock guards @generation, @first_error and @waits; the drain takes
 * it once per drain, not once per job. No callback, cancellation or
 * unref runs under it, and nothing is taken under it. It is taken alone,
 * but for one nesting: a waiting async submission of the group that its
 * key refuses is taken back (kd_group_state_unqueued()) under the
 * dispatcher's @async_lock, and may drain the group there. A wait's
 * cancellation (a ::cancelled handler, under none of ours) takes it alone.
 */

#include "config.h"

#include "kd-cancel-watch-private.h"
#include "kd-dispatcher-stage-private.h"
#include "kd-error.h"
#include "kd-group-private.h"
#include "kd-submit-result-private.h"
#include "kd-sync-private.h"
#include "kd-task-private.h"

struct _KdGroup
{
  GObject       parent_instance;

  KdDispatcher *dispatcher;      /* a reference; set at construction */
  KdGroupState *state;           /* a reference */
};

struct _KdGroupState
{
  gint          ref_count;       /* the group's, its pending jobs', its async waits' */
  GCancellable *cancellable;
  gint          fail_fast;       /* atomic */
  gint          priority;        /* atomic: its jobs' (kd_group_set_priority()) */

  /* Atomic counters */
  guint64       submitted;
  guint64       completed;
  guint64       failed;
  guint64       cancelled;
  guint64       rejected;
  guint64       pending;         /* jobs entered and not ended */

  GMutex        lock;
  GCond         drained;         /* broadcast at each drain */
  guint64       generation;      /* drains so far; under @lock */
  GError       *first_error;     /* under @lock; set once */
  GQueue        waits;           /* GroupWait *, under @lock */
};

G_DEFINE_FINAL_TYPE (KdGroup, kd_group, G_TYPE_OBJECT)

enum
{
  PROP_0,
  PROP_DISPATCHER,
  PROP_CANCELLABLE,
  PROP_FAIL_FAST,
  PROP_PRIORITY,
  N_PROPS
};

static GParamSpec *properties[N_PROPS];

static KdGroupState *
kd_group_state_new (void)
{
  KdGroupState *self = g_new0 (KdGroupState, 1);

  self->ref_count = 1;
  self->cancellable = g_cancellable_new ();
  g_mutex_init (&self->lock);
  g_cond_init (&self->drained);
  g_queue_init (&self->waits);
  return self;
}

/* The last reference goes with the group, its last job record or its last
 * async wait, whichever goes last, on any thread: every job and async wait
 * held one, so nothing is pending. */
void
kd_group_state_unref (KdGroupState *self)
{
  if (!g_atomic_int_dec_and_test (&self->ref_count))
    return;

  g_assert (self->pending == 0);
  g_assert (g_queue_is_empty (&self->waits));
  g_clear_error (&self->first_error);
  g_object_unref (self->cancellable);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->drained);
  g_free (self);
}

/* A kd_group_wait_async() in progress. */
typedef struct
{
  KdGroupState   *state;      /* a reference */
  gint            ref_count;  /* the setup's, and @waits' until drained or cancelled */
  KdSubmitResult *result;     /* until completed, by whoever takes it */
  KdCancelWatch  *watch;      /* NULL without a cancellable */
} GroupWait;

static void
group_wait_unref (GroupWait *wait)
{
  if (!g_atomic_int_dec_and_test (&wait->ref_count))
    return;

  /* Not in a cancel call on another thread once this returns. */
  g_clear_pointer (&wait->watch, kd_cancel_watch_free);
  kd_group_state_unref (wait->state);
  g_free (wait);
}

/* The wait's cancellable: completes it, and drops @waits' reference if
 * the drain has not taken it yet. */
static void
group_wait_cancelled (gpointer user_data)
{
  GroupWait *wait = user_data;
  KdGroupState *self = wait->state;
  gboolean listed;

  kd_submit_result_complete_once (&wait->result,
                                  g_error_new_literal (G_IO_ERROR, G_IO_ERROR_CANCELLED,
                                                       "The wait was cancelled"));
  kd_mutex_lock (&self->lock);
  listed = g_queue_remove (&self->waits, wait);
  kd_mutex_unlock (&self->lock);
  if (listed)
    group_wait_unref (wait);
}

/* A copy of the group's first error, or NULL; with @lock held. */
static GError *
copy_first_error_locked (KdGroupState *self)
{
  return self->first_error != NULL ? g_error_copy (self->first_error) : NULL;
}

/* @pending fell to zero: wakes the blocking waits and completes the async
 * ones. */
static void
drain (KdGroupState *self)
{
  GList *waits, *l;
  GError *error;

  kd_mutex_lock (&self->lock);
  /* A job submitted since @pending fell to zero: no drain after all (a wait
   * that began meanwhile must wait for it). */
  if (__atomic_load_n (&self->pending, __ATOMIC_ACQUIRE) != 0)
    {
      kd_mutex_unlock (&self->lock);
      return;
    }
  self->generation++;
  g_cond_broadcast (&self->drained);
  waits = g_steal_pointer (&self->waits.head);
  g_queue_init (&self->waits);
  error = copy_first_error_locked (self);
  kd_mutex_unlock (&self->lock);

  for (l = waits; l != NULL; l = l->next)
    {
      GroupWait *wait = l->data;

      kd_submit_result_complete_once (&wait->result, error != NULL ? g_error_copy (error) : NULL);
      group_wait_unref (wait);
    }
  g_list_free (waits);
  g_clear_error (&error);
}

/* One job of the group fewer: the last one drains it. The job's reference
 * goes after its done callback (kd-dispatcher.c), which may yet run in a
 * main context. */
static void
leave (KdGroupState *self)
{
  if (__atomic_sub_fetch (&self->pending, 1, __ATOMIC_ACQ_REL) == 0)
    drain (self);
}

/* Whether submits through the group are still taken: not once its
 * cancellable is cancelled. */
gboolean
kd_group_state_check_open (KdGroupState  *self,
                           GError       **error)
{
  if (G_LIKELY (!g_cancellable_is_cancelled (self->cancellable)))
    return TRUE;

  g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_CANCELLED, "The group was cancelled");
  return FALSE;
}

void
kd_group_state_count_rejected (KdGroupState *self)
{
  __atomic_fetch_add (&self->rejected, 1, __ATOMIC_RELAXED);
}

/* A job of the group is about to be queued: counted before it can end. */
void
kd_group_state_enter (KdGroupState *self)
{
  g_atomic_int_inc (&self->ref_count);
  __atomic_fetch_add (&self->pending, 1, __ATOMIC_RELAXED);
  __atomic_fetch_add (&self->submitted, 1, __ATOMIC_RELEASE);
}

/* The job kd_group_enter() counted was never queued. */
void
kd_group_state_unqueued (KdGroupState *self)
{
  __atomic_fetch_sub (&self->submitted, 1, __ATOMIC_RELAXED);
  leave (self);
}

gboolean
kd_group_state_is_cancelled (KdGroupState *self)
{
  return g_cancellable_is_cancelled (self->cancellable);
}

/* A job of the group is ending with @error (failed or cancelled): the
 * first such error is the group's. Before the done callback takes it. */
void
kd_group_state_note_error (KdGroupState *self,
                           const GError *error)
{
  if (g_atomic_pointer_get (&self->first_error) != NULL)
    return;

  kd_mutex_lock (&self->lock);
  if (self->first_error == NULL)
    g_atomic_pointer_set (&self->first_error, g_error_copy (error));
  kd_mutex_unlock (&self->lock);
}

/* A job of the group ended: its done callback and item-free ran (with a
 * main context, its handler returned). On the worker that ended it. */
void
kd_group_state_job_ended (KdGroupState *self,
                          KdGroupEnd    end)
{
  switch (end)
    {
    case KD_GROUP_COMPLETED:
      __atomic_fetch_add (&self->completed, 1, __ATOMIC_RELEASE);
      break;
    case KD_GROUP_FAILED:
      __atomic_fetch_add (&self->failed, 1, __ATOMIC_RELEASE);
      /* Before the job lets the group go: the group lives meanwhile. */
      if (g_atomic_int_get (&self->fail_fast))
        g_cancellable_cancel (self->cancellable);
      break;
    case KD_GROUP_CANCELLED:
      __atomic_fetch_add (&self->cancelled, 1, __ATOMIC_RELEASE);
      break;
    default:
      g_assert_not_reached ();
    }
  leave (self);
}

static void
kd_group_get_property (GObject    *object,
                       guint       prop_id,
                       GValue     *value,
                       GParamSpec *pspec)
{
  KdGroup *self = KD_GROUP (object);

  switch (prop_id)
    {
    case PROP_DISPATCHER:
      g_value_set_object (value, self->dispatcher);
      break;
    case PROP_CANCELLABLE:
      g_value_set_object (value, self->state->cancellable);
      break;
    case PROP_FAIL_FAST:
      g_value_set_boolean (value, kd_group_get_fail_fast (self));
      break;
    case PROP_PRIORITY:
      g_value_set_int (value, kd_group_get_priority (self));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
kd_group_set_property (GObject      *object,
                       guint         prop_id,
                       const GValue *value,
                       GParamSpec   *pspec)
{
  KdGroup *self = KD_GROUP (object);

  switch (prop_id)
    {
    case PROP_DISPATCHER:
      self->dispatcher = g_value_dup_object (value);
      break;
    case PROP_FAIL_FAST:
      kd_group_set_fail_fast (self, g_value_get_boolean (value));
      break;
    case PROP_PRIORITY:
      kd_group_set_priority (self, g_value_get_int (value));
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID (object, prop_id, pspec);
    }
}

static void
kd_group_constructed (GObject *object)
{
  KdGroup *self = KD_GROUP (object);

  G_OBJECT_CLASS (kd_group_parent_class)->constructed (object);

  /* g_object_new() without a dispatcher: the calls below refuse it. */
  if (self->dispatcher == NULL)
    g_critical ("KdGroup: made without a dispatcher (see kd_group_new())");
}

/* Where the application (or an async call's result, in its context) drops
 * the last reference: the jobs still pending keep the state, not the
 * group, so the dispatcher's last reference never goes implicitly on one
 * of its own workers. */
static void
kd_group_finalize (GObject *object)
{
  KdGroup *self = KD_GROUP (object);

  kd_group_state_unref (self->state);
  /* Last: this may be the dispatcher's last reference. */
  g_clear_object (&self->dispatcher);

  G_OBJECT_CLASS (kd_group_parent_class)->finalize (object);
}

static void
kd_group_class_init (KdGroupClass *klass)
{
  GObjectClass *object_class = G_OBJECT_CLASS (klass);

  object_class->get_property = kd_group_get_property;
  object_class->set_property = kd_group_set_property;
  object_class->constructed = kd_group_constructed;
  object_class->finalize = kd_group_finalize;

  /**
   * KdGroup:dispatcher:
   *
   * The dispatcher the group's jobs run on.
   *
   * Since: 0.1
   */
  properties[PROP_DISPATCHER] =
    g_param_spec_object ("dispatcher", NULL, NULL, KD_TYPE_DISPATCHER,
                         G_PARAM_READWRITE | G_PARAM_CONSTRUCT_ONLY | G_PARAM_STATIC_STRINGS);

  /**
   * KdGroup:cancellable:
   *
   * The group's own cancellable (see kd_group_get_cancellable()).
   *
   * Since: 0.1
   */
  properties[PROP_CANCELLABLE] =
    g_param_spec_object ("cancellable", NULL, NULL, G_TYPE_CANCELLABLE,
                         G_PARAM_READABLE | G_PARAM_STATIC_STRINGS);

  /**
   * KdGroup:fail-fast:
   *
   * Whether the group's first failed job cancels the group (see
   * kd_group_set_fail_fast()).
   *
   * Since: 0.1
   */
  properties[PROP_FAIL_FAST] =
    g_param_spec_boolean ("fail-fast", NULL, NULL, FALSE,
                          G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);

  /**
   * KdGroup:priority:
   *
   * The priority of the jobs submitted through the group, on GLib's scale
   * (see kd_group_set_priority()).
   *
   * Since: 0.1
   */
  properties[PROP_PRIORITY] =
    g_param_spec_int ("priority", NULL, NULL, G_MININT, G_MAXINT, G_PRIORITY_DEFAULT,
                      G_PARAM_READWRITE | G_PARAM_EXPLICIT_NOTIFY | G_PARAM_STATIC_STRINGS);

  g_object_class_install_properties (object_class, N_PROPS, properties);
}

static void
kd_group_init (KdGroup *self)
{
  self->state = kd_group_state_new ();
}

/* What the group's jobs share with it (kd-group-private.h). */
KdGroupState *
kd_group_get_state (KdGroup *self)
{
  return self->state;
}

GCancellable *
kd_group_state_get_cancellable (KdGroupState *self)
{
  return self->cancellable;
}

/**
 * KdGroup:
 *
 * A set of jobs of one dispatcher, counted, awaited and cancelled
 * together, as a request handler needs for the jobs it submitted while
 * other producers use the same dispatcher.
 *
 * Jobs submitted through a group ([method@Kd.Group.submit] and its
 * variants; any key or none) are the dispatcher's jobs in every way: its
 * bound, its per-key order (across groups too), its counters, its done
 * callback and its cancellation. The group adds its own counters
 * ([method@Kd.Group.get_stats]), its own barrier ([method@Kd.Group.wait],
 * [method@Kd.Group.wait_until], [method@Kd.Group.wait_async]) that waits
 * for its jobs only, the first error among its jobs, and its own
 * cancellable: cancelling it ends the group's jobs that have not started
 * as cancelled and refuses further submits through the group. In
 * fail-fast mode ([method@Kd.Group.set_fail_fast]) the group's first failed
 * job cancels it.
 *
 * A handler finds its group's cancellable with
 * [method@Kd.Job.get_group_cancellable]. See [Groups](groups.html).
 *
 * Since: 0.1
 */

/**
 * kd_group_new:
 * @dispatcher: the dispatcher to run the group's jobs
 *
 * Creates a group of jobs of @dispatcher. It holds a reference to the
 * dispatcher; its jobs hold references to what they share with the group
 * (its counters, barrier and cancellable), not to the group itself, so the
 * group goes when the application drops it.
 *
 * Returns: (transfer full): a new group
 *
 * Since: 0.1
 */
KdGroup *
kd_group_new (KdDispatcher *dispatcher)
{
  g_return_val_if_fail (KD_IS_DISPATCHER (dispatcher), NULL);

  return g_object_new (KD_TYPE_GROUP, "dispatcher", dispatcher, NULL);
}

/**
 * kd_group_get_dispatcher:
 * @self: a group
 *
 * Gets the dispatcher the group's jobs run on.
 *
 * Returns: (transfer none): the group's dispatcher
 *
 * Since: 0.1
 */
KdDispatcher *
kd_group_get_dispatcher (KdGroup *self)
{
  g_return_val_if_fail (KD_IS_GROUP (self), NULL);

  return self->dispatcher;
}

/**
 * kd_group_get_cancellable:
 * @self: a group
 *
 * Gets the group's own cancellable. Cancelling it ends the group's jobs
 * that have not started with %G_IO_ERROR_CANCELLED (as workers reach them,
 * in their keys' order, through the done callback; a job waiting for a
 * retry, when its retry comes), and refuses further submits through the
 * group with %G_IO_ERROR_CANCELLED. Running handlers may watch it (see
 * kd_job_get_group_cancellable()). The dispatcher and its other jobs are not
 * touched.
 *
 * Returns: (transfer none): the group's cancellable
 *
 * Since: 0.1
 */
GCancellable *
kd_group_get_cancellable (KdGroup *self)
{
  g_return_val_if_fail (KD_IS_GROUP (self), NULL);

  return self->state->cancellable;
}

/**
 * kd_group_set_fail_fast:
 * @self: a group
 * @fail_fast: whether the first failure cancels the group
 *
 * In fail-fast mode, the first job of the group that ends failed (after
 * its last attempt, see kd_dispatcher_set_retry()) cancels the group's
 * cancellable (see kd_group_get_cancellable()): the group's jobs that have
 * not started end cancelled, and the group's waits report that failure.
 * It cancels the group as that job ends: after its done callback ran, or,
 * with a main context on the dispatcher, once its handler returned (the
 * done callback follows there). Off by default; it can
 * be changed at any time, and applies to the failures from then on.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_group_set_fail_fast (KdGroup  *self,
                        gboolean  fail_fast)
{
  g_return_if_fail (KD_IS_GROUP (self));

  fail_fast = !!fail_fast;
  if (g_atomic_int_exchange (&self->state->fail_fast, fail_fast) != fail_fast)
    g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_FAIL_FAST]);
}

/**
 * kd_group_get_fail_fast:
 * @self: a group
 *
 * Gets whether the group is in fail-fast mode (see
 * kd_group_set_fail_fast()).
 *
 * Returns: %TRUE if the first failure cancels the group
 *
 * Since: 0.1
 */
gboolean
kd_group_get_fail_fast (KdGroup *self)
{
  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);

  return g_atomic_int_get (&self->state->fail_fast);
}

/**
 * kd_group_set_priority:
 * @self: a group
 * @priority: the priority of the group's jobs, on GLib's scale:
 *   %G_PRIORITY_HIGH, %G_PRIORITY_DEFAULT (the default),
 *   %G_PRIORITY_HIGH_IDLE, %G_PRIORITY_DEFAULT_IDLE, %G_PRIORITY_LOW
 *
 * Sets the priority of the jobs submitted through the group from now on:
 * where they wait among the dispatcher's ready work. A dispatcher has
 * three classes of ready work: above the default (a priority below 0),
 * the default (0 to 99), and idle (100 and above); jobs submitted without
 * a group are of the default class. Workers take ready work of the highest
 * class first, in arrival order within a class; so that no class starves,
 * a worker takes at least one of every 24 tasks from each class that has
 * ready work (see [Priorities](priorities.html)).
 *
 * A keyed job's priority counts when its key becomes ready: the key waits
 * among the ready work of that job's class, and then runs its jobs in
 * their order, whatever their priorities. A key that is already waiting or
 * running keeps its place. Per-key order never changes.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_group_set_priority (KdGroup *self,
                       gint     priority)
{
  g_return_if_fail (KD_IS_GROUP (self));

  if (g_atomic_int_exchange (&self->state->priority, priority) != priority)
    g_object_notify_by_pspec (G_OBJECT (self), properties[PROP_PRIORITY]);
}

/**
 * kd_group_get_priority:
 * @self: a group
 *
 * Gets the priority of the group's jobs (see kd_group_set_priority()).
 *
 * Returns: the priority, on GLib's scale
 *
 * Since: 0.1
 */
gint
kd_group_get_priority (KdGroup *self)
{
  g_return_val_if_fail (KD_IS_GROUP (self), G_PRIORITY_DEFAULT);

  return g_atomic_int_get (&self->state->priority);
}

/* The class of ready work the group's jobs wait in. */
guint
kd_group_state_get_band (KdGroupState *self)
{
  return kd_band_for_priority (g_atomic_int_get (&self->priority));
}

/**
 * kd_group_submit:
 * @self: a group
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @error: return location for a #GError
 *
 * Submits a job to the group's dispatcher, as kd_dispatcher_submit() does
 * (it blocks at the bound), and counts it in the group. A job's key orders
 * it with every job of that key, in this group, in others and outside any.
 *
 * On failure @item is still the caller's: %G_IO_ERROR_CANCELLED once the
 * group is cancelled, or any error of kd_dispatcher_submit(). The refusal
 * counts in the group's and the dispatcher's rejected counters.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_group_submit (KdGroup     *self,
                 const char  *key,
                 gpointer     item,
                 GError     **error)
{
  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (self->dispatcher != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_dispatcher_submit_in_group (self->dispatcher, self->state, key, item, KD_ITEM_POINTER,
                                        KD_ADMIT_BLOCK, 0, error);
}

/**
 * kd_group_submit_value:
 * @self: a group
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @value: the job's item: any #GValue, copied
 * @error: return location for a #GError
 *
 * Like kd_group_submit(), with a value for the item, as
 * kd_dispatcher_submit_value(): the job holds a copy of @value, which the
 * dispatcher frees once the job ended. A refused submit keeps no copy.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_group_submit_value (KdGroup       *self,
                       const char    *key,
                       const GValue  *value,
                       GError       **error)
{
  GValue *item;

  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (self->dispatcher != NULL, FALSE);
  g_return_val_if_fail (G_IS_VALUE (value), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  item = kd_item_new_value (value);
  if (kd_dispatcher_submit_in_group (self->dispatcher, self->state, key, item, KD_ITEM_VALUE,
                                     KD_ADMIT_BLOCK, 0, error))
    return TRUE;

  kd_item_free_value (item);
  return FALSE;
}

/**
 * kd_group_try_submit:
 * @self: a group
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @error: return location for a #GError
 *
 * Like kd_group_submit(), but never blocks, as kd_dispatcher_try_submit():
 * at the bound it fails with %KD_ERROR_FULL.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_group_try_submit (KdGroup     *self,
                     const char  *key,
                     gpointer     item,
                     GError     **error)
{
  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (self->dispatcher != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_dispatcher_submit_in_group (self->dispatcher, self->state, key, item, KD_ITEM_POINTER,
                                        KD_ADMIT_TRY, 0, error);
}

/**
 * kd_group_submit_timeout:
 * @self: a group
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @timeout_us: how long to wait for room, in microseconds
 * @error: return location for a #GError
 *
 * Like kd_group_submit(), but waits at most @timeout_us for room, as
 * kd_dispatcher_submit_timeout(): then it fails with %KD_ERROR_TIMEOUT.
 *
 * Thread-safe.
 *
 * Returns: %TRUE if the job was accepted
 *
 * Since: 0.1
 */
gboolean
kd_group_submit_timeout (KdGroup     *self,
                         const char  *key,
                         gpointer     item,
                         gint64       timeout_us,
                         GError     **error)
{
  gint64 now = g_get_monotonic_time ();

  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (self->dispatcher != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (timeout_us > G_MAXINT64 - now)
    return kd_dispatcher_submit_in_group (self->dispatcher, self->state, key, item,
                                          KD_ITEM_POINTER, KD_ADMIT_BLOCK, 0, error);
  return kd_dispatcher_submit_in_group (self->dispatcher, self->state, key, item, KD_ITEM_POINTER,
                                        KD_ADMIT_DEADLINE, now + MAX (timeout_us, 0), error);
}

/**
 * kd_group_submit_async:
 * @self: a group
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @item: (nullable): the job's item, handed to the handler
 * @cancellable: (nullable): cancels this submission until its job starts
 * @callback: (scope async) (nullable) (closure user_data): called once the
 *   job has ended, or the submission was refused
 * @user_data: data for @callback
 *
 * Submits a job through the group without ever blocking, as
 * kd_dispatcher_submit_async() does (with its waiting for room, its order
 * and its callback in the caller's context), and counts it in the group
 * once it is accepted. A submission made once the group is cancelled is
 * refused with %G_IO_ERROR_CANCELLED. Finish with kd_group_submit_finish().
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_group_submit_async (KdGroup             *self,
                       const char          *key,
                       gpointer             item,
                       GCancellable        *cancellable,
                       GAsyncReadyCallback  callback,
                       gpointer             user_data)
{
  g_return_if_fail (KD_IS_GROUP (self));
  g_return_if_fail (self->dispatcher != NULL);
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  kd_dispatcher_submit_async_in_group (self->dispatcher, self, key, item, KD_ITEM_POINTER,
                                       cancellable, callback, user_data);
}

/**
 * kd_group_submit_value_async:
 * @self: a group
 * @key: (nullable): the job's key, or %NULL for an unkeyed job
 * @value: the job's item: any #GValue, copied
 * @cancellable: (nullable): cancels this submission until its job starts
 * @callback: (scope async) (nullable) (closure user_data): called once the
 *   job has ended, or the submission was refused
 * @user_data: data for @callback
 *
 * kd_group_submit_async() with a value for the item, as
 * kd_dispatcher_submit_value_async(): the job holds a copy of @value,
 * freed once the job ended, or once the submission was refused. Call
 * kd_group_submit_value_finish() from @callback.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_group_submit_value_async (KdGroup             *self,
                             const char          *key,
                             const GValue        *value,
                             GCancellable        *cancellable,
                             GAsyncReadyCallback  callback,
                             gpointer             user_data)
{
  g_return_if_fail (KD_IS_GROUP (self));
  g_return_if_fail (self->dispatcher != NULL);
  g_return_if_fail (G_IS_VALUE (value));
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  kd_dispatcher_submit_async_in_group (self->dispatcher, self, key, kd_item_new_value (value),
                                       KD_ITEM_VALUE, cancellable, callback, user_data);
}

/**
 * kd_group_submit_value_finish:
 * @self: a group
 * @result: the #GAsyncResult given to the callback of
 *   kd_group_submit_value_async()
 * @error: return location for a #GError
 *
 * Tells how a value submission through the group ended, as
 * kd_group_submit_finish().
 *
 * Returns: %TRUE if the job ran and completed
 *
 * Since: 0.1
 */
gboolean
kd_group_submit_value_finish (KdGroup       *self,
                              GAsyncResult  *result,
                              GError       **error)
{
  return kd_group_submit_finish (self, result, error);
}

/**
 * kd_group_submit_finish:
 * @self: a group
 * @result: the #GAsyncResult given to the callback of
 *   kd_group_submit_async()
 * @error: return location for a #GError
 *
 * Tells how a submission through the group ended, as
 * kd_dispatcher_submit_finish() does.
 *
 * Returns: %TRUE if the job ran and completed
 *
 * Since: 0.1
 */
gboolean
kd_group_submit_finish (KdGroup       *self,
                        GAsyncResult  *result,
                        GError       **error)
{
  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (KD_IS_SUBMIT_RESULT (result), FALSE);
  g_return_val_if_fail (g_async_result_is_tagged (result, KD_GROUP_SUBMIT_TAG), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_submit_result_propagate (KD_SUBMIT_RESULT (result), error);
}

/* The end of a wait that saw the group drain: its first error, if any. */
static gboolean
drained_result (KdGroup  *self,
                GError  **error)
{
  GError *first;

  kd_mutex_lock (&self->state->lock);
  first = copy_first_error_locked (self->state);
  kd_mutex_unlock (&self->state->lock);

  if (first == NULL)
    return TRUE;
  g_propagate_error (error, first);
  return FALSE;
}

/**
 * kd_group_wait_until:
 * @self: a group
 * @end_time: the monotonic time to give up at, as g_get_monotonic_time()
 *   counts it; %G_MAXINT64 for never
 * @error: return location for a #GError
 *
 * Waits until every job submitted through the group before the call has
 * ended (its done callback and item-free ran; with a main context, its
 * handler returned): at the first moment after the call when none of the
 * group's jobs is pending. Other jobs of the dispatcher do not delay it.
 * Gives up at @end_time with %G_IO_ERROR_TIMED_OUT; giving up changes
 * nothing for the jobs.
 *
 * Once the jobs ended, reports the group's first error, if any: the error
 * of the first of its jobs to end failed or cancelled since the group was
 * made (a copy).
 *
 * Thread-safe, but not from the dispatcher's own threads (its handlers, a
 * done callback on a worker), where the group's jobs could wait for the
 * very worker that waits: there it fails with %G_IO_ERROR_WOULD_BLOCK (use
 * kd_group_wait_async()).
 *
 * Returns: %TRUE if the group's jobs ended and none failed or was
 *   cancelled
 *
 * Since: 0.1
 */
gboolean
kd_group_wait_until (KdGroup  *self,
                     gint64    end_time,
                     GError  **error)
{
  gboolean drained = TRUE;
  guint64 generation;

  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (self->dispatcher != NULL, FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  if (kd_dispatcher_runs_here (self->dispatcher))
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_WOULD_BLOCK,
                           "A group cannot be waited for on its dispatcher's own threads, "
                           "where its jobs may need the waiting thread; use "
                           "kd_group_wait_async()");
      return FALSE;
    }

  kd_mutex_lock (&self->state->lock);
  generation = self->state->generation;
  while (drained && __atomic_load_n (&self->state->pending, __ATOMIC_ACQUIRE) > 0 &&
         self->state->generation == generation)
    {
      if (end_time == G_MAXINT64)
        kd_cond_wait (&self->state->drained, &self->state->lock);
      else if (!kd_cond_wait_until (&self->state->drained, &self->state->lock, end_time))
        drained = self->state->generation != generation ||
                  __atomic_load_n (&self->state->pending, __ATOMIC_ACQUIRE) == 0;
    }
  kd_mutex_unlock (&self->state->lock);

  if (!drained)
    {
      g_set_error_literal (error, G_IO_ERROR, G_IO_ERROR_TIMED_OUT,
                           "The group's jobs did not end in time");
      return FALSE;
    }
  return drained_result (self, error);
}

/**
 * kd_group_wait:
 * @self: a group
 * @error: return location for a #GError
 *
 * Waits until every job submitted through the group before the call has
 * ended, as kd_group_wait_until() without an end time: then reports the
 * group's first error, if any.
 *
 * Thread-safe, but not from the dispatcher's own threads (see
 * kd_group_wait_until()).
 *
 * Returns: %TRUE if the group's jobs ended and none failed or was
 *   cancelled
 *
 * Since: 0.1
 */
gboolean
kd_group_wait (KdGroup  *self,
               GError  **error)
{
  return kd_group_wait_until (self, G_MAXINT64, error);
}

/**
 * kd_group_wait_async:
 * @self: a group
 * @cancellable: (nullable): stops waiting (the jobs are not touched)
 * @callback: (scope async) (closure user_data): called in the caller's
 *   thread-default main context once the group's jobs ended
 * @user_data: data for @callback
 *
 * The barrier of kd_group_wait() without blocking: @callback runs in the
 * thread-default main context of the caller, in a later iteration, once
 * every job submitted through the group before the call has ended. If the
 * dispatcher has no main context of its own
 * (kd_dispatcher_set_main_context()), it runs after the callbacks of the
 * group's async submissions made from the same context before the call.
 * Finish with kd_group_wait_finish(), which reports the group's first
 * error.
 *
 * Cancelling @cancellable before then completes the wait at once with
 * %G_IO_ERROR_CANCELLED; the jobs go on. It may be called from anywhere,
 * the dispatcher's handlers included. Holds a reference to @self until
 * @callback ran.
 *
 * Since: 0.1
 */
void
kd_group_wait_async (KdGroup             *self,
                     GCancellable        *cancellable,
                     GAsyncReadyCallback  callback,
                     gpointer             user_data)
{
  KdSubmitResult *result;
  GroupWait *wait;

  g_return_if_fail (KD_IS_GROUP (self));
  g_return_if_fail (self->dispatcher != NULL);
  g_return_if_fail (cancellable == NULL || G_IS_CANCELLABLE (cancellable));

  result = kd_dispatcher_new_group_result (self->dispatcher, self, KD_GROUP_WAIT_TAG, NULL, NULL,
                                           callback, user_data);

  kd_mutex_lock (&self->state->lock);
  if (__atomic_load_n (&self->state->pending, __ATOMIC_ACQUIRE) == 0)
    {
      GError *first = copy_first_error_locked (self->state);

      /* Drained already: never listed, nobody else has it. */
      kd_mutex_unlock (&self->state->lock);
      kd_submit_result_complete (result, first);
      return;
    }

  wait = g_new0 (GroupWait, 1);
  wait->state = self->state;
  g_atomic_int_inc (&self->state->ref_count);
  wait->result = result;
  wait->ref_count = 2;
  g_queue_push_tail (&self->state->waits, wait);
  kd_mutex_unlock (&self->state->lock);

  /* Runs group_wait_cancelled() at once if already cancelled. */
  if (cancellable != NULL)
    wait->watch = kd_cancel_watch_new (cancellable, group_wait_cancelled, wait);
  group_wait_unref (wait);
}

/**
 * kd_group_wait_finish:
 * @self: a group
 * @result: the #GAsyncResult given to the callback of
 *   kd_group_wait_async()
 * @error: return location for a #GError
 *
 * Tells how an async wait for the group ended.
 *
 * Returns: %TRUE if the group's jobs ended and none failed or was
 *   cancelled; %FALSE with the group's first error, or with
 *   %G_IO_ERROR_CANCELLED if the wait was cancelled first
 *
 * Since: 0.1
 */
gboolean
kd_group_wait_finish (KdGroup       *self,
                      GAsyncResult  *result,
                      GError       **error)
{
  g_return_val_if_fail (KD_IS_GROUP (self), FALSE);
  g_return_val_if_fail (KD_IS_SUBMIT_RESULT (result), FALSE);
  g_return_val_if_fail (g_async_result_is_tagged (result, KD_GROUP_WAIT_TAG), FALSE);
  g_return_val_if_fail (error == NULL || *error == NULL, FALSE);

  return kd_submit_result_propagate (KD_SUBMIT_RESULT (result), error);
}

/**
 * kd_group_get_stats:
 * @self: a group
 * @stats: (out caller-allocates): where to store the counters
 *
 * Takes a snapshot of the group's counters: the jobs submitted through it
 * and accepted, how they ended (completed, failed, cancelled), those
 * pending, and the submits through it that were refused. (A submit waiting
 * for room in its key, kd_dispatcher_set_key_capacity(), counts as
 * submitted and pending while it waits; if it gives up, it is taken back
 * and counted as refused.) In every snapshot
 * `submitted == completed + failed + cancelled + pending`. The dispatcher's
 * other counters (running, live keys, retried, parked keys) are 0 here.
 *
 * Thread-safe.
 *
 * Since: 0.1
 */
void
kd_group_get_stats (KdGroup *self,
                    KdStats *stats)
{
  g_return_if_fail (KD_IS_GROUP (self));
  g_return_if_fail (stats != NULL);

  memset (stats, 0, sizeof *stats);
  stats->completed = __atomic_load_n (&self->state->completed, __ATOMIC_ACQUIRE);
  stats->failed = __atomic_load_n (&self->state->failed, __ATOMIC_ACQUIRE);
  stats->cancelled = __atomic_load_n (&self->state->cancelled, __ATOMIC_ACQUIRE);
  /* Read after the ended counters: every job counted as ended was counted
   * as submitted before, so pending cannot go negative. */
  stats->submitted = __atomic_load_n (&self->state->submitted, __ATOMIC_ACQUIRE);
  stats->pending = stats->submitted - stats->completed - stats->failed - stats->cancelled;
  stats->rejected = __atomic_load_n (&self->state->rejected, __ATOMIC_RELAXED);
}
