/* kd-delivery.c: callbacks delivered on a GMainContext, in order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A delivery is a GSource attached to a main context, with a FIFO of tasks:
 * ended jobs, whose done callback and item-free must run there, or the
 * results of kd_dispatcher_submit_async(), whose callback must. Workers push
 * tasks as jobs end; the source runs the deliver function for each, in the
 * context's thread. One FIFO per dispatcher and context is enough for
 * per-key order, because the jobs of one key end one after another on the
 * worker side.
 *
 * Pushing only appends under @lock and wakes the context when the queue
 * goes from empty to non-empty (g_main_context_wakeup() is thread-safe);
 * prepare and check look at an atomic copy of the length.
 *
 * Time slices: workers can end jobs faster than a main loop delivers them
 * (a GTK done callback that updates a row costs far more than a handler
 * that counts). A dispatch delivers for at most DELIVERY_SLICE_US; if tasks
 * are left, the source sits out the next iteration of the context (not
 * ready, but no blocking poll either), so every other source gets its turn,
 * including those of lower priority, such as GTK's redraw, which a source
 * ready at every iteration would starve. Under a flood of results the
 * application still handles input and paints between slices.
 *
 * Flushing, in the dispatcher's shutdown (kd_delivery_flush(), after its
 * jobs ended): the tasks still queued must be delivered before the shutdown
 * ends, so before the last unref returns when it shuts down at once. If the flushing thread can
 * acquire the context, no other thread is dispatching it, so it delivers
 * them itself, as the context's owner, which is what GLib allows. If another
 * thread owns the context, that thread is iterating it and will deliver
 * them: the flusher waits, and tries to acquire the context again now and
 * then in case that thread stops iterating.
 */

#include "config.h"

#include "kd-delivery-private.h"
#include "kd-sync-private.h"

/* How long a flush waits for the owning thread before it tries to acquire
 * the context again. */
#define FLUSH_RETRY_US (100 * G_TIME_SPAN_MILLISECOND)

/* The longest a dispatch delivers before the source lets the others run, and
 * how many tasks it delivers between looks at the clock. */
#define DELIVERY_SLICE_US (5 * G_TIME_SPAN_MILLISECOND)
#define DELIVERY_CLOCK_STRIDE 8

struct _KdDelivery
{
  GSource       source;

  /* Immutable */
  KdDeliverFunc func;
  gpointer      user_data;

  /* Protected by @lock */
  GMutex        lock;
  GCond         drained_cond;
  KdTaskList    tasks;
  GThread      *dispatching;  /* the thread running deliveries right now */

  gint          n_tasks;      /* atomic copy of tasks.length */

  /* The context's thread only */
  gboolean      sitting_out;  /* the last slice left tasks: skip an iteration */
};

/* The context's thread looks at the source in prepare, check and dispatch,
 * and the last reference may be dropped on another thread, which frees it.
 * GLib orders the two with its context lock, which ThreadSanitizer cannot
 * see; these marks tell it (they compile to nothing otherwise). */
static gboolean
has_tasks (KdDelivery *self)
{
  gboolean has_tasks = g_atomic_int_get (&self->n_tasks) > 0;

  kd_tsan_release (self);
  return has_tasks;
}

static gboolean
kd_delivery_prepare (GSource *source,
                     gint    *timeout)
{
  KdDelivery *self = (KdDelivery *) source;

  /* Sitting out: not ready, yet the poll must not block. */
  if (self->sitting_out)
    {
      *timeout = 0;
      return FALSE;
    }

  *timeout = -1;
  return has_tasks (self);
}

static gboolean
kd_delivery_check (GSource *source)
{
  KdDelivery *self = (KdDelivery *) source;

  if (self->sitting_out)
    {
      self->sitting_out = FALSE;
      return FALSE;
    }

  return has_tasks (self);
}

/* Runs the deliver function for the queued tasks, in order: all of them if
 * @deadline is negative, else until the monotonic clock reaches @deadline.
 * Returns whether tasks are left. */
static gboolean
deliver_queued (KdDelivery *self,
                gint64      deadline)
{
  KdTask *chain;
  KdTask *last;
  guint n, delivered = 0;
  gboolean left;

  /* The whole queue, without a walk: what the slice leaves goes back in
   * front of what was pushed meanwhile. */
  kd_mutex_lock (&self->lock);
  chain = self->tasks.head;
  last = self->tasks.tail;
  n = self->tasks.length;
  self->tasks = (KdTaskList) { NULL, NULL, 0 };
  g_atomic_int_add (&self->n_tasks, -(gint) n);
  self->dispatching = g_thread_self ();
  kd_mutex_unlock (&self->lock);

  while (chain != NULL)
    {
      KdTask *next = chain->next;

      self->func (chain, self->user_data);
      chain = next;
      delivered++;

      if (deadline >= 0 && chain != NULL &&
          delivered % DELIVERY_CLOCK_STRIDE == 0 &&
          g_get_monotonic_time () >= deadline)
        break;
    }

  kd_mutex_lock (&self->lock);
  self->dispatching = NULL;
  if (chain != NULL)
    {
      last->next = self->tasks.head;
      if (self->tasks.head == NULL)
        self->tasks.tail = last;
      self->tasks.head = chain;
      self->tasks.length += n - delivered;
      g_atomic_int_add (&self->n_tasks, (gint) (n - delivered));
    }
  left = self->tasks.length > 0;
  if (!left)
    g_cond_broadcast (&self->drained_cond);
  kd_mutex_unlock (&self->lock);

  return left;
}

static gboolean
kd_delivery_dispatch (GSource     *source,
                      GSourceFunc  callback,
                      gpointer     user_data)
{
  (void) callback;
  (void) user_data;

  KdDelivery *self = (KdDelivery *) source;

  self->sitting_out = deliver_queued (self, g_get_monotonic_time () + DELIVERY_SLICE_US);
  kd_tsan_release (source);
  return G_SOURCE_CONTINUE;
}

static void
kd_delivery_finalize (GSource *source)
{
  KdDelivery *self = (KdDelivery *) source;

  kd_tsan_acquire (self);
  g_assert (self->tasks.length == 0);
  g_mutex_clear (&self->lock);
  g_cond_clear (&self->drained_cond);
}

static GSourceFuncs kd_delivery_funcs = {
  .prepare = kd_delivery_prepare,
  .check = kd_delivery_check,
  .dispatch = kd_delivery_dispatch,
  .finalize = kd_delivery_finalize,
};

/* @name: the source's name, a static string */
KdDelivery *
kd_delivery_new (GMainContext  *context,
                 const char    *name,
                 KdDeliverFunc  func,
                 gpointer       user_data)
{
  KdDelivery *self = (KdDelivery *) g_source_new (&kd_delivery_funcs, sizeof (KdDelivery));

  self->func = func;
  self->user_data = user_data;
  g_mutex_init (&self->lock);
  g_cond_init (&self->drained_cond);
  g_source_set_static_name (&self->source, name);
  g_source_attach (&self->source, context);

  return self;
}

/* Any thread. */
void
kd_delivery_push (KdDelivery *self,
                  KdTask     *task)
{
  gboolean was_empty;

  kd_mutex_lock (&self->lock);
  was_empty = self->tasks.length == 0;
  kd_task_list_push (&self->tasks, task);
  g_atomic_int_add (&self->n_tasks, 1);
  /* Under the lock: once the task is delivered, the source and its context
   * may go (an async result's delivery ends with its last result), but not
   * before the delivering thread took the lock after us. */
  if (was_empty)
    g_main_context_wakeup (g_source_get_context (&self->source));
  kd_mutex_unlock (&self->lock);
}

/* Whether the calling thread is running deliveries right now, that is,
 * whether it is inside a done callback of this delivery. */
gboolean
kd_delivery_is_dispatching (KdDelivery *self)
{
  gboolean dispatching;

  kd_mutex_lock (&self->lock);
  dispatching = self->dispatching == g_thread_self ();
  kd_mutex_unlock (&self->lock);

  return dispatching;
}

/* Returns once every task pushed before the call has been delivered. Not from
 * inside a delivery. */
void
kd_delivery_flush (KdDelivery *self)
{
  GMainContext *context = g_source_get_context (&self->source);

  for (;;)
    {
      gboolean drained = FALSE;

      if (g_main_context_acquire (context))
        {
          deliver_queued (self, -1);
          g_main_context_release (context);
          return;
        }

      kd_mutex_lock (&self->lock);
      while (!drained)
        {
          drained = self->tasks.length == 0 && self->dispatching == NULL;
          if (drained ||
              !kd_cond_wait_until (&self->drained_cond, &self->lock,
                                   g_get_monotonic_time () + FLUSH_RETRY_US))
            break;
        }
      kd_mutex_unlock (&self->lock);

      if (drained)
        return;
    }
}

/* After kd_delivery_flush(): detaches the source. */
void
kd_delivery_destroy (KdDelivery *self)
{
  g_source_destroy (&self->source);
  g_source_unref (&self->source);
}
