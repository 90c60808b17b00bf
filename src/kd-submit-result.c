/* kd-submit-result.c: the GAsyncResult of the dispatcher's async calls
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * One result per async submission (or async wait, kd-dispatcher-async.c
 * and kd-group.c, which has no item, key or job: it is completed when its
 * barrier holds or it is cancelled), alive from the call until its
 * callback returned (longer only if the application keeps a reference). It
 * holds what the callback needs (a reference to the dispatcher, and to the
 * group for a call made on a KdGroup, which is then the source object; the
 * callback and its data), what admission needs while the submission waits
 * for room (its key, its item, its group, the per-call cancellable), and,
 * once the job ended, how it ended.
 *
 * It is completed exactly once, from any thread: by the worker (or main
 * context) that ends its job, or by the dispatcher when the submission is
 * refused. Completing pushes it on the delivery of the caller's thread-default
 * main context, which runs the callback there in a later iteration, never
 * from inside the submit call. A delivery is a FIFO, and the jobs of one key
 * end one after another, so a key's callbacks come in submission order (not
 * GTask: it completes in an idle source of its own per task, or at once when
 * returned on the caller's thread, which loses that order, and one GSource
 * per job would cost a GTK application a million sources for a million
 * jobs).
 *
 * The deliveries are the dispatcher's KdResultRegistry: one per caller
 * context with results pending, made by the first result made there and
 * freed, with the reference it holds on the context, by the last one
 * delivered (a context may be freed, a thread's, once nothing is promised
 * to it). The registry has a lock of its own, taken alone.
 *
 * The waiting queue and the delivery link results through @task, which they
 * never use at the same time.
 */

#include "config.h"

#include "kd-submit-result-private.h"
#include "kd-sync-private.h"

/* Where the callbacks of the async submissions made in one main context go.
 * It lives while results are pending for it. */
typedef struct
{
  KdResultRegistry *registry;
  GMainContext     *context;      /* a reference */
  KdDelivery       *delivery;
  guint             pending;      /* results not yet delivered; under the registry's lock */
} ResultDelivery;

struct _KdResultRegistry
{
  GMutex     lock;
  GPtrArray *deliveries;          /* ResultDelivery *, under @lock */
};

static void deliver (KdTask   *task,
                     gpointer  user_data);

struct _KdSubmitResult
{
  GObject              parent_instance;

  KdTask               task;         /* in the waiting queue, then in @target's delivery */
  gpointer             source_tag;   /* the call it is the result of */
  KdDispatcher        *dispatcher;   /* a reference */
  KdGroup             *group;        /* a reference, for a group's calls; their source */
  ResultDelivery      *target;       /* the caller's context's, in the dispatcher's registry */
  GCancellable        *cancellable;  /* nullable */
  GAsyncReadyCallback  callback;     /* nullable */
  gpointer             user_data;
  char                *key;          /* while it waits for room; nullable */
  gpointer             item;
  KdItemKind           item_kind;    /* a value is the result's until a job takes it */
  gboolean             refused;      /* no job took the item */
  GError              *error;        /* how the job ended; set once, when completed */
  gint                 completed;    /* atomic */
};

static void kd_submit_result_async_result_init (GAsyncResultIface *iface);

G_DEFINE_FINAL_TYPE_WITH_CODE (KdSubmitResult, kd_submit_result, G_TYPE_OBJECT,
                               G_IMPLEMENT_INTERFACE (G_TYPE_ASYNC_RESULT,
                                                      kd_submit_result_async_result_init))

static gpointer
kd_submit_result_get_user_data (GAsyncResult *result)
{
  return KD_SUBMIT_RESULT (result)->user_data;
}

/* The object the call was made on: the group, or else the dispatcher. */
static GObject *
source_object (KdSubmitResult *self)
{
  return self->group != NULL ? G_OBJECT (self->group) : G_OBJECT (self->dispatcher);
}

static GObject *
kd_submit_result_get_source_object (GAsyncResult *result)
{
  return g_object_ref (source_object (KD_SUBMIT_RESULT (result)));
}

static gboolean
kd_submit_result_is_tagged (GAsyncResult *result,
                            gpointer      source_tag)
{
  return source_tag == KD_SUBMIT_RESULT (result)->source_tag;
}

static void
kd_submit_result_async_result_init (GAsyncResultIface *iface)
{
  iface->get_user_data = kd_submit_result_get_user_data;
  iface->get_source_object = kd_submit_result_get_source_object;
  iface->is_tagged = kd_submit_result_is_tagged;
}

static void
kd_submit_result_finalize (GObject *object)
{
  KdSubmitResult *self = KD_SUBMIT_RESULT (object);

  g_clear_error (&self->error);
  g_clear_object (&self->cancellable);
  g_free (self->key);
  /* Last: this may be the dispatcher's last reference (the group holds
   * one too). */
  g_clear_object (&self->group);
  g_clear_object (&self->dispatcher);

  G_OBJECT_CLASS (kd_submit_result_parent_class)->finalize (object);
}

static void
kd_submit_result_class_init (KdSubmitResultClass *klass)
{
  G_OBJECT_CLASS (klass)->finalize = kd_submit_result_finalize;
}

static void
kd_submit_result_init (KdSubmitResult *self)
{
  (void) self;
}

KdResultRegistry *
kd_result_registry_new (void)
{
  KdResultRegistry *self = g_new0 (KdResultRegistry, 1);

  g_mutex_init (&self->lock);
  self->deliveries = g_ptr_array_new ();
  return self;
}

/* Once no result is pending any more. */
void
kd_result_registry_free (KdResultRegistry *self)
{
  g_assert (self->deliveries->len == 0);
  g_ptr_array_unref (self->deliveries);
  g_mutex_clear (&self->lock);
  g_free (self);
}

/* The delivery for one more result in @context, made if none is pending
 * there. */
static ResultDelivery *
result_delivery_take (KdResultRegistry *self,
                      GMainContext     *context)
{
  ResultDelivery *found = NULL;
  guint i;

  kd_mutex_lock (&self->lock);
  for (i = 0; i < self->deliveries->len && found == NULL; i++)
    if (((ResultDelivery *) g_ptr_array_index (self->deliveries, i))->context == context)
      found = g_ptr_array_index (self->deliveries, i);
  if (found == NULL)
    {
      found = g_new0 (ResultDelivery, 1);
      found->registry = self;
      found->context = g_main_context_ref (context);
      found->delivery = kd_delivery_new (context, "kdispatch async results",
                                         deliver, found);
      g_ptr_array_add (self->deliveries, found);
    }
  found->pending++;
  kd_mutex_unlock (&self->lock);

  return found;
}

/* After a result's callback ran, in its context's thread, from the
 * dispatch of @done's delivery: the last one pending lets the delivery and
 * the context go (GLib keeps a source alive while it dispatches). */
static void
result_delivered (ResultDelivery *done)
{
  KdResultRegistry *self = done->registry;
  gboolean last;

  kd_mutex_lock (&self->lock);
  g_assert (done->pending > 0);
  last = --done->pending == 0;
  if (last)
    g_ptr_array_remove_fast (self->deliveries, done);
  kd_mutex_unlock (&self->lock);

  if (last)
    {
      kd_delivery_destroy (done->delivery);
      g_main_context_unref (done->context);
      g_free (done);
    }
}

/* A result for a call of @source_tag's (a submission with its @item, or an
 * async wait) made now, whose callback runs in the calling thread's
 * thread-default context, through @results. */
KdSubmitResult *
kd_submit_result_new (KdDispatcher        *dispatcher,
                      KdResultRegistry    *results,
                      gpointer             source_tag,
                      gpointer             item,
                      GCancellable        *cancellable,
                      GAsyncReadyCallback  callback,
                      gpointer             user_data)
{
  KdSubmitResult *self = g_object_new (KD_TYPE_SUBMIT_RESULT, NULL);
  GMainContext *context = g_main_context_ref_thread_default ();

  self->source_tag = source_tag;
  self->dispatcher = g_object_ref (dispatcher);
  self->target = result_delivery_take (results, context);
  g_main_context_unref (context);
  self->item = item;
  if (cancellable != NULL)
    self->cancellable = g_object_ref (cancellable);
  self->callback = callback;
  self->user_data = user_data;

  return self;
}

/* A call made on @group, one of the dispatcher's groups: the group is its
 * source object, and a submission's job is the group's. */
void
kd_submit_result_set_group (KdSubmitResult *self,
                            KdGroup        *group)
{
  self->group = g_object_ref (group);
}

/* The group of a submission made through one, or NULL. */
KdGroup *
kd_submit_result_get_group (KdSubmitResult *self)
{
  return self->group;
}

KdTask *
kd_submit_result_get_task (KdSubmitResult *self)
{
  return &self->task;
}

KdSubmitResult *
kd_submit_result_from_task (KdTask *task)
{
  return (KdSubmitResult *) (void *) ((char *) task - G_STRUCT_OFFSET (KdSubmitResult, task));
}

/* A submission that waits for room keeps a copy of its key until then
 * (one admitted at once is keyed in the dispatcher's table directly). */
void
kd_submit_result_keep_key (KdSubmitResult *self,
                           const char     *key)
{
  self->key = g_strdup (key);
}

const char *
kd_submit_result_get_key (KdSubmitResult *self)
{
  return self->key;
}

gpointer
kd_submit_result_get_item (KdSubmitResult *self)
{
  return self->item;
}

/* The submission's item is a value (kd_item_new_value()), which the
 * result frees if it is refused. */
void
kd_submit_result_set_value_item (KdSubmitResult *self)
{
  self->item_kind = KD_ITEM_VALUE;
}

KdItemKind
kd_submit_result_get_item_kind (KdSubmitResult *self)
{
  return self->item_kind;
}

/* A refused submission: no job took its item, which stays the caller's,
 * unless it is a value of kdispatch's own: deliver() frees that one, on
 * the caller's context, before the callback. Not here: the refusal may
 * come under the dispatcher's async_lock, and dropping a value runs
 * application code (a finalize, a weak notify, a Python __del__). */
void
kd_submit_result_refuse_item (KdSubmitResult *self)
{
  self->refused = TRUE;
}

/* Whether the per-call cancellable was cancelled. */
gboolean
kd_submit_result_is_cancelled (KdSubmitResult *self)
{
  return g_cancellable_is_cancelled (self->cancellable);
}

/* Ends the submission with @error (transfer full; NULL: the job completed)
 * and queues the callback on the caller's context. Takes over the caller's
 * reference. Any thread. */
void
kd_submit_result_complete (KdSubmitResult *self,
                           GError         *error)
{
  gboolean first = g_atomic_int_compare_and_exchange (&self->completed, FALSE, TRUE);

  g_assert (first);
  self->error = error;
  kd_delivery_push (self->target->delivery, &self->task);
}

/* Completes the result in *@slot, unless another thread took it first:
 * an async wait's result, which its drain and its cancellation race to
 * complete. @error: transfer full (NULL: the wait held). Any thread. */
void
kd_submit_result_complete_once (KdSubmitResult **slot,
                                GError          *error)
{
  KdSubmitResult *self = g_atomic_pointer_exchange (slot, NULL);

  if (self != NULL)
    kd_submit_result_complete (self, error);
  else
    g_clear_error (&error);
}

/* The delivery's function (@user_data: its ResultDelivery): runs the
 * callback on the caller's context and drops the reference the submission
 * held. */
static void
deliver (KdTask   *task,
         gpointer  user_data)
{
  KdSubmitResult *self = kd_submit_result_from_task (task);

  if (self->refused && self->item_kind == KD_ITEM_VALUE)
    kd_item_free_value (g_steal_pointer (&self->item));
  if (self->callback != NULL)
    self->callback (source_object (self), G_ASYNC_RESULT (self), self->user_data);
  result_delivered (user_data);
  g_object_unref (self);
}

/* For the finish functions of the dispatcher's and its groups' calls. */
gboolean
kd_submit_result_propagate (KdSubmitResult  *self,
                            GError         **error)
{
  g_return_val_if_fail (g_atomic_int_get (&self->completed), FALSE);

  if (self->error != NULL)
    {
      g_propagate_error (error, g_error_copy (self->error));
      return FALSE;
    }

  return TRUE;
}
