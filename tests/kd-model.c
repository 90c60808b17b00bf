/* kd-model.c: a model-based randomized test of KdDispatcher
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A run decodes a program (see kd-model.h), builds one dispatcher with the
 * program's configuration, gives each of the program's threads a reference
 * of its own, and lets the threads run their operations at once. Every
 * submitted item is a record of the model (KdModelItem) reached through a
 * small heap token, so a double item_free or a leak is also an ASan,
 * LeakSanitizer or valgrind report. Everything the dispatcher's threads do
 * to an item is counted and stamped with a tick of one global atomic clock;
 * every call a model thread makes is stamped before and after.
 *
 * What is checked, as it happens:
 *
 *  - a handler runs at most once per item, with the item's key (a copy: the
 *    submitter scribbles over its key buffer as soon as submit returns),
 *    never at the same time as another handler of its key, with the key's
 *    state (made by state_new, not yet freed, the only live state of the
 *    key) and the dispatcher's cancellable, which reads cancelled once a
 *    g_cancellable_cancel() returned;
 *  - the done callback runs once, before item_free, with NULL for a
 *    completed item, the handler's own GError for a failed one and
 *    G_IO_ERROR_CANCELLED for one that never ran; item_free runs once;
 *    both in the main context's thread when there is one;
 *  - a refused submit returns FALSE with an error of the right code for the
 *    call (submit: CLOSED; try_submit: FULL or CLOSED; submit_timeout:
 *    TIMEOUT or CLOSED) and the item stays the caller's;
 *  - when wait() returns (or wait_until() returns TRUE, or wait_async()'s
 *    callback runs in the thread's context), every item accepted before it
 *    was called (by any thread: its submit returned before the wait began)
 *    has ended: its done callback and item_free ran, or with a main context
 *    its handler is over; a wait_until() that gives up does so no earlier
 *    than its end time;
 *  - every stats snapshot: submitted == completed + failed + cancelled +
 *    pending, counters that only grow, at least the calling thread's own
 *    accepted and refused submits;
 *  - retries (kd_dispatcher_set_retry(); items fail their first attempts,
 *    some every one): attempt n runs after n - 1 runs, never past
 *    max_attempts nor after a success; an item ends failed (the handler's
 *    error) only on its last attempt or, once the dispatcher is cancelled,
 *    earlier; cancelled while its retry waited it ends CANCELLED. The
 *    dead-letter function runs once per item that ended failed, on a
 *    worker, before its done callback, never for another;
 *  - KD_FAILURE_PARK: the done callback of a failed keyed item marks its
 *    key parked in the model and resumes it, drops it, or leaves it to a
 *    resume op or the janitor (a model thread that resolves a key still
 *    parked a millisecond after it saw the park, and cancels the dispatcher
 *    3 ms after the first retry began when a huge retry delay waits; see
 *    janitor_main()); whoever resolves it clears the mark first, and the
 *    call must return TRUE. No handler of a key runs while it is marked
 *    parked;
 *  - a per-key capacity: after a submit returns and when an item first
 *    runs, the key's accepted and not ended items are at most the capacity
 *    plus the submits to the key in progress (unless a cancel or a drop
 *    ended items the model counts as ended only later);
 *  - worker funcs: handlers and dead letters see the data that their own
 *    thread's init made; init and finalize run once per worker, on the same
 *    thread; with kd_dispatcher_start(), every worker's init ran when it
 *    returned.
 *
 * And at the end of the run, the checks of kd-model-checks.c.
 *
 * Threads never sleep to wait for each other: the start is a gate, the end a
 * counter, the janitor blocks until it has news or one of its deadlines
 * comes, and handlers take their time with busy loops or g_thread_yield().
 */

#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kd-model-private.h"

#define STATE_LIVE 0x6b647374u
#define STATE_DEAD 0xdead57a7u

/* The first violations a run keeps the text of. */
#define MAX_REPORTED 24

/* Key 1 is the empty string, a key like any other; key 5 is longer than any
 * inline buffer a library might keep. */
const char *const kd_model_keys[KD_MODEL_MAX_KEYS] = {
  "k0",
  "",
  "client-42",
  "k3",
  "\xc3\xa9t\xc3\xa9",
  "a-key-long-enough-that-no-inline-buffer-holds-it-0123456789abcdefghijklmnopqrstuvwxyz",
  "k6",
  "K6",
};

static gboolean model_fatal;

typedef struct
{
  guint32  magic;
  KdModel *model;
  guint    key;
  guint    jobs;   /* only the key's running handler touches it */
} KeyState;

static void janitor_wake_up (KdModel *model);

static GQuark
model_error_quark (void)
{
  return g_quark_from_static_string ("kd-model-error");
}

/* ------------------------------------------------------------------------ */
/* Violations                                                               */

/* Records a violation, or a hit of a known library bug (@known), which is a
 * violation too in strict mode. */
static void G_GNUC_PRINTF (4, 0)
model_record (KdModel    *model,
              gboolean    known,
              const char *where,
              const char *format,
              va_list     args)
{
  char *message = g_strdup_vprintf (format, args);
  gint *count;
  GString *into;

  if (known && model->strict)
    {
      char *strict = g_strconcat ("known library bug: ", message, NULL);

      g_free (message);
      message = strict;
      known = FALSE;
    }

  if (!known && model_fatal)
    {
      char *description = kd_model_program_describe (model->program);

      g_printerr ("kd-model: %s: %s\nkd-model: program: %s", where, message, description);
      abort ();
    }

  kd_mutex_lock (&model->lock);
  count = known ? &model->n_known : &model->n_violations;
  into = known ? model->known : model->report;
  if ((*count)++ < MAX_REPORTED)
    g_string_append_printf (into, "%s: %s\n", where, message);
  kd_mutex_unlock (&model->lock);
  g_free (message);
}

void
kd_model_violation (KdModel    *model,
                    const char *where,
                    const char *format,
                    ...)
{
  va_list args;

  va_start (args, format);
  model_record (model, FALSE, where, format, args);
  va_end (args);
}

void
kd_model_known_bug (KdModel    *model,
                    const char *where,
                    const char *format,
                    ...)
{
  va_list args;

  va_start (args, format);
  model_record (model, TRUE, where, format, args);
  va_end (args);
}

/* A 32-bit mix, for per-item choices the program makes once. */
static guint32
mix32 (guint32 x)
{
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

static const char *
key_name (KdModel *model,
          guint    key)
{
  return key < model->n_keys ? kd_model_keys[key] : NULL;
}

/* The key index of @key, n_keys for NULL, G_MAXUINT if unknown. */
static guint
key_index (KdModel    *model,
           const char *key)
{
  guint i;

  if (key == NULL)
    return model->n_keys;
  for (i = 0; i < model->n_keys; i++)
    if (strcmp (key, kd_model_keys[i]) == 0)
      return i;
  return G_MAXUINT;
}

static KdModelItem *
token_item (KdModel    *model,
            Token      *token,
            const char *where)
{
  if (token == NULL || token->magic != TOKEN_LIVE)
    {
      kd_model_violation (model, where, "an item that is not a live item: %p (magic %x)",
                       (gpointer) token, token != NULL ? token->magic : 0);
      return NULL;
    }
  return token->item;
}

/* ------------------------------------------------------------------------ */
/* What the dispatcher calls                                                */

typedef struct
{
  guint32  magic;
  KdModel *model;
  guint    index;
  GThread *thread;
} WorkerData;

#define WORKER_LIVE 0x6b64776bu
#define WORKER_DEAD 0xdead3077u

/* The worker data of the calling thread, checked. */
static void
check_worker_data (KdModel    *model,
                   KdJob      *job,
                   guint       id,
                   const char *where)
{
  WorkerData *data = kd_job_get_worker_data (job);

  if (!model->program->worker_funcs)
    {
      CHECK (model, data == NULL, "item %u: %s sees worker data without worker funcs", id, where);
      return;
    }
  CHECK (model, data != NULL && data->magic == WORKER_LIVE,
         "item %u: %s sees no live worker data (%p)", id, where, (gpointer) data);
  if (data != NULL && data->magic == WORKER_LIVE)
    CHECK (model, data->thread == g_thread_self (),
           "item %u: %s sees the data of worker %u, another thread", id, where, data->index);
}

gboolean
kd_model_item_failed (KdModel     *model,
                      KdModelItem *item)
{
  guint runs = (guint) g_atomic_int_get (&item->handler_runs);

  return runs > 0 && runs <= item->fail_attempts &&
         (runs >= model->program->max_attempts || g_atomic_int_get (&item->ended_failed));
}

gboolean
kd_model_may_skip (KdModel     *model,
                   KdModelItem *item)
{
  return g_atomic_int_get (&model->cancel_started) != 0 || item->group_fail_fast ||
         (item->key < model->n_keys && g_atomic_int_get (&model->key_drops[item->key]) != 0);
}

gboolean
kd_model_key_count_exact (KdModel     *model,
                          KdModelItem *item)
{
  return !kd_model_may_skip (model, item) && g_atomic_int_get (&model->fail_fast_groups) == 0;
}

/* The item no longer counts against its key's capacity. */
void
kd_model_item_uncount (KdModel     *model,
                       KdModelItem *item)
{
  if (item->key >= model->n_keys ||
      g_atomic_int_compare_and_exchange (&item->pending_counted, 0, 2))
    return;   /* not counted yet: its submit did not return */
  if (g_atomic_int_compare_and_exchange (&item->pending_counted, 1, 2))
    g_atomic_int_add (&model->key_pending[item->key], -1);
}

/* Whether @item may run (and fail) on a key the model still sees parked:
 * once the last unref began, the library drops every parked key (a key
 * whose job fails from then on is dropped at once, see park_end()), and a
 * delayed job that comes due after the drop joins the key afresh, as a
 * job submitted after a drop_key() would. Only a delayed job can join a
 * key then: every thread's submits returned before the last unref. */
static gboolean
joins_after_drop (KdModel     *model,
                           KdModelItem *item)
{
  return item->how == HOW_AFTER && g_atomic_int_get (&model->last_unref_started);
}

/* A deferred job's end, for the returner. */
typedef struct
{
  KdJob       *job;
  KdModelItem *item;
  gboolean     exclusive;
  gboolean     fails;
  guint        attempt;
} Return;

static gboolean handler_end (KdModel     *model,
                             KdModelItem *item,
                             gboolean     exclusive,
                             gboolean     fails,
                             guint        attempt,
                             GError     **error);

static gboolean
model_handler (KdJob    *job,
               gpointer  user_data,
               GError  **error)
{
  KdModel *model = user_data;
  KdModelItem *item = token_item (model, kd_job_get_item (job), G_STRLOC);
  GCancellable *cancellable = kd_job_get_cancellable (job);
  gpointer state = kd_job_get_key_state (job);
  gboolean exclusive = FALSE;
  guint max_attempts = model->program->max_attempts;
  guint attempt, runs;
  gboolean fails;
  gint tick;
  guint key;

  if (item == NULL)
    return TRUE;

  key = item->key;
  attempt = kd_job_get_attempt (job);
  runs = (guint) g_atomic_int_add (&item->handler_runs, 1);
  CHECK (model, attempt == runs + 1, "item %u: attempt %u after %u runs", item->id, attempt, runs);
  CHECK (model, attempt <= max_attempts, "item %u: attempt %u of at most %u", item->id, attempt,
         max_attempts);
  CHECK (model, runs == 0 || runs <= item->fail_attempts,
         "item %u: ran again (attempt %u) after it completed", item->id, attempt);
  CHECK (model, key_index (model, kd_job_get_key (job)) == key,
         "item %u: handler sees key \"%s\", submitted with \"%s\"", item->id,
         kd_job_get_key (job) != NULL ? kd_job_get_key (job) : "(null)",
         key_name (model, key) != NULL ? key_name (model, key) : "(null)");
  tick = kd_model_tick (model);
  g_atomic_int_set (&item->run_tick, tick);
  if (runs == 0)
    g_atomic_int_set (&item->first_run_tick, tick);
  if (runs == 0 && item->how == HOW_AFTER)
    CHECK (model, g_get_monotonic_time () >= item->due_us,
           "item %u: delayed, ran before its due time", item->id);
  g_atomic_int_set (&item->handler_returned, 0);
  check_worker_data (model, job, item->id, "the handler");

  if (key < model->n_keys)
    {
      exclusive = g_atomic_int_compare_and_exchange (&model->key_running[key], 0, 1);
      CHECK (model, exclusive, "item %u: a handler of key %u was already running", item->id, key);
      CHECK (model, g_atomic_int_get (&model->key_parked[key]) == 0 ||
                    joins_after_drop (model, item),
             "item %u: runs (attempt %u) while its key %u is parked", item->id, attempt, key);
      if (runs == 0 && model->program->key_capacity > 0 && kd_model_key_count_exact (model, item))
        CHECK (model, g_atomic_int_get (&model->key_pending[key]) <=
                      (gint) model->program->key_capacity + g_atomic_int_get (&model->key_submitting[key]),
               "item %u: key %u has %d pending (%d submits in progress) for a key capacity of %u",
               item->id, key, g_atomic_int_get (&model->key_pending[key]),
               g_atomic_int_get (&model->key_submitting[key]), model->program->key_capacity);
    }

  if (model->program->key_states && key < model->n_keys)
    {
      KeyState *key_state = state;

      CHECK (model, key_state != NULL && key_state->magic == STATE_LIVE,
             "item %u: no live key state (%p)", item->id, state);
      if (key_state != NULL && key_state->magic == STATE_LIVE)
        {
          CHECK (model, key_state->key == key, "item %u: the state of key %u, not %u",
                 item->id, key_state->key, key);
          key_state->jobs++;
        }
      CHECK (model, g_atomic_int_get (&model->key_live_states[key]) == 1,
             "item %u: key %u has %d live states", item->id, key,
             g_atomic_int_get (&model->key_live_states[key]));
    }
  else
    {
      CHECK (model, state == NULL, "item %u: a key state without key states", item->id);
    }

  CHECK (model, cancellable != NULL, "item %u: no cancellable", item->id);
  if (model->cancellable != NULL)
    CHECK (model, cancellable == model->cancellable,
           "item %u: not the cancellable the dispatcher was given", item->id);

  if (item->yield)
    g_thread_yield ();
  kd_test_spin (item->spin);

  /* Read the model's mark first: once it is set, cancel returned. */
  if (g_atomic_int_get (&model->cancelled_by) != 0)
    CHECK (model, g_cancellable_is_cancelled (cancellable),
           "item %u: the running handler does not see the cancel", item->id);

  CHECK (model, !g_atomic_int_get (&item->failed_cancelled),
         "item %u: retried (attempt %u) after it failed with the dispatcher cancelled",
         item->id, attempt);
  fails = attempt <= item->fail_attempts;
  /* Once cancelled no job is retried: this one ends failed */
  if (fails && g_cancellable_is_cancelled (cancellable))
    g_atomic_int_set (&item->failed_cancelled, 1);
  if (!fails || attempt >= max_attempts)
    kd_model_item_uncount (model, item);
  else
    {
      gboolean first;

      kd_mutex_lock (&model->lock);
      first = model->retries++ == 0;
      if (first)
        model->first_retry_us = g_get_monotonic_time ();
      kd_mutex_unlock (&model->lock);
      /* The janitor cancels a huge delay a while after the first retry. */
      if (first && model->program->retry_huge)
        janitor_wake_up (model);
    }

  /* Deferred: the returner ends it, holding the key until then. */
  if (item->deferred)
    {
      Return *r = g_new (Return, 1);

      *r = (Return) { job, item, exclusive, fails, attempt };
      kd_job_defer (job);
      kd_tsan_release (r);
      g_async_queue_push (model->returns, r);
      return TRUE;
    }

  return handler_end (model, item, exclusive, fails, attempt, error);
}

/* The end of a handler's run: on its worker, or on the returner for a
 * deferred job. */
static gboolean
handler_end (KdModel     *model,
             KdModelItem *item,
             gboolean     exclusive,
             gboolean     fails,
             guint        attempt,
             GError     **error)
{
  g_atomic_int_set (&item->return_tick, kd_model_tick (model));
  if (exclusive)
    g_atomic_int_set (&model->key_running[item->key], 0);
  g_atomic_int_set (&item->handler_returned, 1);

  if (fails)
    {
      g_set_error (error, model_error_quark (), (gint) item->id, "item %u failed (attempt %u)",
                   item->id, attempt);
      return FALSE;
    }
  return TRUE;
}

/* Ends the deferred jobs as their handlers would have, in the order their
 * handlers deferred them, until told to stop (the model itself, as the
 * sentinel). */
static gpointer
returner_main (gpointer data)
{
  KdModel *model = data;
  gpointer next;

  while ((next = g_async_queue_pop (model->returns)) != model)
    {
      Return *r = next;
      GError *error = NULL;

      kd_tsan_acquire (r);
      if (handler_end (model, r->item, r->exclusive, r->fails, r->attempt, &error))
        kd_job_return_success (r->job);
      else
        kd_job_return_error (r->job, error);
      g_free (r);
    }
  return NULL;
}

static void
returner_start (KdModel *model)
{
  model->returns = g_async_queue_new ();
  model->returner = g_thread_new ("model-returner", returner_main, model);
}

static void
returner_stop (KdModel *model)
{
  g_async_queue_push (model->returns, model);
  g_thread_join (g_steal_pointer (&model->returner));
  g_clear_pointer (&model->returns, g_async_queue_unref);
}

static void
model_dead_letter (KdJob        *job,
                   const GError *error,
                   gpointer      user_data)
{
  KdModel *model = user_data;
  KdModelItem *item = token_item (model, kd_job_get_item (job), G_STRLOC);

  if (item == NULL)
    return;
  CHECK (model, g_atomic_int_add (&item->dead_letters, 1) == 0, "item %u: dead letter twice",
         item->id);
  CHECK (model, g_atomic_int_get (&item->done_calls) == 0,
         "item %u: dead letter after its done callback", item->id);
  /* Its last attempt, or no retry once cancelled */
  CHECK (model, (guint) g_atomic_int_get (&item->handler_runs) <= item->fail_attempts &&
                ((guint) g_atomic_int_get (&item->handler_runs) >= model->program->max_attempts ||
                 g_atomic_int_get (&model->cancel_started) != 0),
         "item %u: dead letter after %d runs (fails %u, max %u attempts)", item->id,
         g_atomic_int_get (&item->handler_runs), item->fail_attempts,
         model->program->max_attempts);
  CHECK (model, kd_job_get_attempt (job) == (guint) g_atomic_int_get (&item->handler_runs),
         "item %u: dead letter sees attempt %u after %d runs", item->id,
         kd_job_get_attempt (job), g_atomic_int_get (&item->handler_runs));
  CHECK (model, g_error_matches (error, model_error_quark (), (gint) item->id),
         "item %u: dead letter with %s", item->id, error != NULL ? error->message : "no error");
  /* A deferred job's dead letter runs where it was returned: on its
   * worker (returned before its handler returned) or on the returner,
   * which is no worker. */
  if (!item->deferred || kd_job_get_worker_data (job) != NULL)
    check_worker_data (model, job, item->id, "the dead letter");
  g_atomic_int_set (&item->ended_failed, 1);
}

/* An item's failure parked its key (PARK): its done callback resumes or
 * drops the key at once, or leaves that to a resume op or the janitor. */
static void
item_parked (KdModel     *model,
             KdModelItem *item)
{
  guint key = item->key;
  guint32 choice = mix32 (item->id ^ 0x5a5a1234u) % 8;

  CHECK (model, g_atomic_int_get (&model->key_parked[key]) == 0 ||
                joins_after_drop (model, item),
         "item %u: key %u parked twice without a resume", item->id, key);
  g_atomic_int_inc (&model->key_parks[key]);
  g_atomic_int_inc (&model->n_parks);
  g_atomic_int_set (&model->key_parked[key], 1);
  if (choice < 3)
    kd_model_resolve_key (model, model->dispatcher, key, FALSE);
  else if (choice < 5)
    kd_model_resolve_key (model, model->dispatcher, key, TRUE);
  else
    janitor_wake_up (model);
}

static void
model_done (KdJob        *job,
            const GError *error,
            gpointer      user_data)
{
  KdModel *model = user_data;
  KdModelItem *item = token_item (model, kd_job_get_item (job), G_STRLOC);
  gint runs;

  if (item == NULL)
    return;

  CHECK (model, g_atomic_int_add (&item->done_calls, 1) == 0, "item %u: done twice", item->id);
  CHECK (model, g_atomic_int_get (&item->free_calls) == 0, "item %u: done after item_free", item->id);
  g_atomic_int_set (&item->done_tick, kd_model_tick (model));

  if (model->context != NULL)
    CHECK (model, g_main_context_is_owner (model->context),
           "item %u: done callback outside the main context", item->id);
  CHECK (model, key_index (model, kd_job_get_key (job)) == item->key,
         "item %u: done callback sees another key", item->id);

  runs = g_atomic_int_get (&item->handler_runs);
  if (runs == 0)
    CHECK (model, g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED),
           "item %u never ran but ends with %s", item->id,
           error != NULL ? error->message : "no error");
  else if (kd_model_item_failed (model, item))
    {
      CHECK (model, g_error_matches (error, model_error_quark (), (gint) item->id),
             "item %u failed but ends with %s", item->id,
             error != NULL ? error->message : "no error");
      if (model->program->dead_letter)
        CHECK (model, g_atomic_int_get (&item->dead_letters) == 1,
               "item %u failed for good with %d dead letters before its done callback",
               item->id, g_atomic_int_get (&item->dead_letters));
    }
  else if ((guint) runs <= item->fail_attempts)
    {
      /* Its last attempt failed and another was due: cancelled meanwhile,
       * while it waited (CANCELLED) or before the retry was scheduled (the
       * handler's error, and a dead letter). */
      CHECK (model, g_atomic_int_get (&model->cancel_started) != 0,
             "item %u failed attempt %d of %u, was not retried, and nobody cancelled",
             item->id, runs, model->program->max_attempts);
      CHECK (model, !g_atomic_int_get (&item->failed_cancelled) ||
                    !g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED),
             "item %u failed attempt %d with the dispatcher cancelled, was not retried, but "
             "ends CANCELLED, not failed", item->id, runs);
      if (!g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
        {
          CHECK (model, g_error_matches (error, model_error_quark (), (gint) item->id),
                 "item %u failed attempt %d of %u and ends with %s", item->id, runs,
                 model->program->max_attempts, error != NULL ? error->message : "no error");
          if (model->program->dead_letter)
            CHECK (model, g_atomic_int_get (&item->dead_letters) == 1,
                   "item %u ended failed after a cancel without a dead letter", item->id);
          g_atomic_int_set (&item->ended_failed, 1);
        }
    }
  else
    CHECK (model, error == NULL, "item %u completed but ends with %s", item->id,
           error != NULL ? error->message : "");
  if (runs == 0 || !kd_model_item_failed (model, item))
    CHECK (model, g_atomic_int_get (&item->dead_letters) == 0,
           "item %u: a dead letter, but it did not fail for good", item->id);
  kd_model_item_uncount (model, item);

  if (model->program->park && item->key < model->n_keys && kd_model_item_failed (model, item))
    item_parked (model, item);
  g_atomic_int_set (&item->done_returned, kd_model_tick (model));
}

static void
model_item_free (gpointer data)
{
  Token *token = data;
  KdModel *model;
  KdModelItem *item;

  if (token == NULL || token->magic != TOKEN_LIVE)
    {
      /* No model to report to: this is a double free. */
      g_printerr ("kd-model: item_free of a dead item %p\n", data);
      abort ();
    }

  model = token->model;
  item = token->item;
  kd_model_item_uncount (model, item);
  CHECK (model, g_atomic_int_add (&item->free_calls, 1) == 0, "item %u: freed twice", item->id);
  if (!model->program->no_done)
    CHECK (model, g_atomic_int_get (&item->done_calls) == 1,
           "item %u: freed before its done callback", item->id);
  if (model->context != NULL)
    CHECK (model, g_main_context_is_owner (model->context),
           "item %u: item_free outside the main context", item->id);

  token->magic = TOKEN_DEAD;
  g_free (token);
}

static gpointer
model_worker_init (KdDispatcher  *dispatcher,
                   guint          worker_index,
                   gpointer       user_data,
                   GError       **error)
{
  KdModel *model = user_data;
  WorkerData *data;

  CHECK (model, worker_index < (guint) g_atomic_int_get (&model->max_workers),
         "worker index %u of at most %d workers", worker_index,
         g_atomic_int_get (&model->max_workers));
  worker_index = MIN (worker_index, G_N_ELEMENTS (model->worker_inits) - 1);
  /* An index starts again (a resize, an idle exit) only once the worker
   * that had it finalized. */
  CHECK (model, g_atomic_int_add (&model->worker_inits[worker_index], 1) ==
                g_atomic_int_get (&model->worker_finalizes[worker_index]),
         "worker %u: init while the index's previous worker is live", worker_index);

  data = g_new0 (WorkerData, 1);
  data->magic = WORKER_LIVE;
  data->model = model;
  data->index = worker_index;
  data->thread = g_thread_self ();
  return data;
}

static void
model_worker_finalize (KdDispatcher *dispatcher,
                       guint         worker_index,
                       gpointer      worker_data,
                       gpointer      user_data)
{
  KdModel *model = user_data;
  WorkerData *data = worker_data;

  if (data == NULL || data->magic != WORKER_LIVE)
    {
      g_printerr ("kd-model: worker finalize of dead worker data %p\n", worker_data);
      abort ();
    }
  CHECK (model, data->index == worker_index, "worker %u finalizes the data of worker %u",
         worker_index, data->index);
  CHECK (model, data->thread == g_thread_self (), "worker %u: finalize on another thread",
         worker_index);
  CHECK (model, g_atomic_int_add (&model->worker_finalizes[data->index], 1) <
                g_atomic_int_get (&model->worker_inits[data->index]),
         "worker %u: finalize ran more often than init", data->index);
  data->magic = WORKER_DEAD;
  g_free (data);
}

static void
model_worker_data_free (gpointer data)
{
  g_atomic_int_inc (&((KdModel *) data)->worker_data_freed);
}

static void
model_dead_letter_data_free (gpointer data)
{
  g_atomic_int_inc (&((KdModel *) data)->dead_letter_data_freed);
}

/* ------------------------------------------------------------------------ */
/* Parked keys, cancels and the janitor                                     */

gboolean
kd_model_resolve_key (KdModel      *model,
                      KdDispatcher *dispatcher,
                      guint         key,
                      gboolean      drop)
{
  gint started;
  gboolean ok;

  if (!g_atomic_int_compare_and_exchange (&model->key_parked[key], 1, 0))
    return FALSE;

  started = kd_model_tick (model);
  g_atomic_int_inc (&model->resolving);
  if (drop)
    {
      kd_mutex_lock (&model->lock);
      if (model->drop_ticks[key] == NULL)
        model->drop_ticks[key] = g_array_new (FALSE, FALSE, sizeof (gint));
      g_array_append_val (model->drop_ticks[key], started);
      kd_mutex_unlock (&model->lock);
      g_atomic_int_inc (&model->key_drops[key]);
      g_atomic_int_inc (&model->n_drops);
      ok = kd_dispatcher_drop_key (dispatcher, kd_model_keys[key]);
    }
  else
    {
      ok = kd_dispatcher_resume_key (dispatcher, kd_model_keys[key]);
    }
  g_atomic_int_add (&model->resolving, -1);

  /* Cancelling the dispatcher drops every parked key. */
  CHECK (model, ok || g_atomic_int_get (&model->cancel_started) != 0 ||
                g_atomic_int_get (&model->last_unref_started),
         "key %u: parked, but %s returned FALSE", key, drop ? "drop_key" : "resume_key");
  return TRUE;
}

void
kd_model_cancel (KdModel      *model,
                 KdDispatcher *dispatcher)
{
  gint started = kd_model_tick (model);
  gint returned;

  kd_model_tick_min (&model->close_started, started);
  kd_model_tick_min (&model->cancel_started, started);
  g_cancellable_cancel (kd_dispatcher_get_cancellable (dispatcher));
  returned = kd_model_tick (model);
  kd_model_tick_min (&model->closed_by, returned);
  kd_model_tick_min (&model->cancelled_by, returned);
}

/* The janitor: resolves keys left parked (half resumed, half dropped), and
 * with a huge retry delay cancels the dispatcher, so that waits end. It is
 * started when the program parks keys or has a huge retry delay, and
 * stopped before the last unref. Each round it
 *
 *  - resolves each key still parked, with the same park count,
 *    JANITOR_RESOLVE_AFTER_US after it first saw that park: the resume ops
 *    of the program's threads get their chance first;
 *  - cancels the dispatcher JANITOR_CANCEL_AFTER_US after the first retry
 *    began, with a huge retry delay;
 *
 * then blocks in @janitor_context until it has something to do. Its own
 * sources wake it: @janitor_wake, made ready by a done callback that leaves
 * a key parked, by the first retry (with a huge delay) and by
 * janitor_stop(); @janitor_deadline, ready at the nearest of the deadlines
 * above while one is pending (with none, the wait has no timeout). In
 * ITERATE mode @janitor_context is the model's context, so the janitor also
 * wakes when one of the dispatcher's sources is ready and delivers the done
 * callbacks that see the parks; in the other modes it is one of its own.
 *
 * The janitor clears @janitor_wake before it looks, so news that arrives
 * while it looks makes the next wait return at once. Its sources dispatch
 * nothing, and at a lower priority than the dispatcher's: an iterate op
 * that finds them ready leaves them to the janitor and still delivers.
 *
 * In ITERATE mode the janitor waits in the context holding @iterate_lock,
 * as every thread that iterates it does, and owns the context all that
 * time: an iterate op would find it taken. So the op counts itself in
 * @iterate_wanted and wakes the janitor, which lets every such op take the
 * lock before it takes it again (kd_model_iterate_context()). */

/* How long a key stays parked, with no park since, before the janitor
 * resolves it. */
#define JANITOR_RESOLVE_AFTER_US (1 * G_TIME_SPAN_MILLISECOND)
/* How long after the first retry began the janitor cancels a huge delay. */
#define JANITOR_CANCEL_AFTER_US  (3 * G_TIME_SPAN_MILLISECOND)

/* Makes the janitor look again, if there is one. Any thread. */
static void
janitor_wake_up (KdModel *model)
{
  if (model->janitor_wake != NULL)
    g_source_set_ready_time (model->janitor_wake, 0);
}

/* The janitor's sources only end its wait; it clears them itself. */
static gboolean
janitor_source_dispatch (GSource     *source,
                         GSourceFunc  callback,
                         gpointer     user_data)
{
  return G_SOURCE_CONTINUE;
}

static GSourceFuncs janitor_source_funcs = {
  .dispatch = janitor_source_dispatch,
};

static GSource *
janitor_source_new (KdModel    *model,
                    const char *name)
{
  GSource *source = g_source_new (&janitor_source_funcs, sizeof (GSource));

  g_source_set_static_name (source, name);
  g_source_set_priority (source, G_PRIORITY_LOW);
  g_source_attach (source, model->janitor_context);
  return source;
}

void
kd_model_iterate_context (KdModel *model)
{
  /* Whether the janitor waits in this context */
  gboolean janitor = model->janitor_context != NULL && model->janitor_context == model->context;

  if (janitor)
    {
      g_atomic_int_inc (&model->iterate_wanted);
      janitor_wake_up (model);
    }

  /* Threads take turns owning the context, which GLib orders with its own
   * lock; ThreadSanitizer cannot see that lock (Debian's GLib is not
   * instrumented) and would report the delivery's context-thread fields.
   * This lock shows it the same order. */
  kd_mutex_lock (&model->iterate_lock);
  if (janitor)
    {
      kd_mutex_lock (&model->lock);
      if (g_atomic_int_dec_and_test (&model->iterate_wanted))
        g_cond_broadcast (&model->iterate_turn);
      kd_mutex_unlock (&model->lock);
    }
  g_main_context_iteration (model->context, FALSE);
  kd_mutex_unlock (&model->iterate_lock);
}

/* Blocks until a source of the janitor's context is ready, and dispatches
 * what is. */
static void
janitor_wait (KdModel *model)
{
  if (model->janitor_context != model->context)
    {
      g_main_context_iteration (model->janitor_context, TRUE);
      return;
    }

  /* GMutex is not fair: the janitor would take the lock again before the
   * iterate ops that woke it. */
  kd_mutex_lock (&model->lock);
  while (g_atomic_int_get (&model->iterate_wanted) > 0)
    kd_cond_wait (&model->iterate_turn, &model->lock);
  kd_mutex_unlock (&model->lock);

  kd_mutex_lock (&model->iterate_lock);
  g_main_context_iteration (model->context, TRUE);
  kd_mutex_unlock (&model->iterate_lock);
}

static gpointer
janitor_main (gpointer data)
{
  KdModel *model = data;
  const KdModelProgram *program = model->program;
  gboolean cancelled = FALSE;
  gint seen_park[KD_MODEL_MAX_KEYS] = { 0 };
  gint64 seen_at[KD_MODEL_MAX_KEYS] = { 0 };
  guint key;

  for (;;)
    {
      gint64 now, deadline = G_MAXINT64;

      g_source_set_ready_time (model->janitor_wake, -1);
      if (g_atomic_int_get (&model->janitor_stop))
        break;

      now = g_get_monotonic_time ();
      for (key = 0; key < model->n_keys; key++)
        {
          gint parks;

          /* The mark first: a count read after it is the park's or a
           * later one's. */
          if (!g_atomic_int_get (&model->key_parked[key]))
            continue;
          parks = g_atomic_int_get (&model->key_parks[key]);
          if (parks != seen_park[key])
            {
              seen_park[key] = parks;
              seen_at[key] = now;
            }
          else if (now >= seen_at[key] + JANITOR_RESOLVE_AFTER_US)
            {
              kd_model_resolve_key (model, model->dispatcher, key, (parks + key) % 2 == 0);
              continue;
            }
          deadline = MIN (deadline, seen_at[key] + JANITOR_RESOLVE_AFTER_US);
        }

      if (program->retry_huge && !cancelled)
        {
          gint64 first;

          kd_mutex_lock (&model->lock);
          first = model->retries > 0 ? model->first_retry_us : 0;
          kd_mutex_unlock (&model->lock);
          if (first != 0 && now >= first + JANITOR_CANCEL_AFTER_US)
            {
              kd_model_cancel (model, model->dispatcher);
              cancelled = TRUE;
            }
          else if (first != 0)
            deadline = MIN (deadline, first + JANITOR_CANCEL_AFTER_US);
        }

      g_source_set_ready_time (model->janitor_deadline, deadline != G_MAXINT64 ? deadline : -1);
      janitor_wait (model);
    }

  return NULL;
}

/* In ITERATE mode the janitor waits in the model's context: started after
 * the first submit attached the dispatcher's sources, it is ordered after
 * the attach by its start, which ThreadSanitizer sees. */
static void
janitor_start (KdModel *model)
{
  if (model->program->context_mode == KD_MODEL_CONTEXT_ITERATE)
    model->janitor_context = g_main_context_ref (model->context);
  else
    model->janitor_context = g_main_context_new ();
  model->janitor_wake = janitor_source_new (model, "model-janitor-wake");
  model->janitor_deadline = janitor_source_new (model, "model-janitor-deadline");
  model->janitor = g_thread_new ("model-janitor", janitor_main, model);
}

static void
janitor_stop (KdModel *model)
{
  if (model->janitor == NULL)
    return;
  g_atomic_int_set (&model->janitor_stop, 1);
  janitor_wake_up (model);
  g_thread_join (g_steal_pointer (&model->janitor));
}

/* At the end of the run: done callbacks and retries, which wake the
 * janitor, may come until the last unref returned. */
static void
janitor_clear (KdModel *model)
{
  if (model->janitor_context == NULL)
    return;
  g_source_destroy (model->janitor_wake);
  g_clear_pointer (&model->janitor_wake, g_source_unref);
  g_source_destroy (model->janitor_deadline);
  g_clear_pointer (&model->janitor_deadline, g_source_unref);
  g_clear_pointer (&model->janitor_context, g_main_context_unref);
}

static gpointer
model_state_new (const char *key,
                 gpointer    user_data)
{
  KdModel *model = user_data;
  guint index = key_index (model, key);
  KeyState *state;

  CHECK (model, index < model->n_keys, "state_new for a key never submitted: \"%s\"",
         key != NULL ? key : "(null)");
  if (index >= model->n_keys)
    index = 0;
  CHECK (model, g_atomic_int_add (&model->key_live_states[index], 1) == 0,
         "key %u: a second state while one lives", index);
  g_atomic_int_inc (&model->states_made);

  state = g_new0 (KeyState, 1);
  state->magic = STATE_LIVE;
  state->model = model;
  state->key = index;
  return state;
}

static void
model_state_free (gpointer data)
{
  KeyState *state = data;
  KdModel *model;

  if (state == NULL || state->magic != STATE_LIVE)
    {
      g_printerr ("kd-model: state_free of a dead key state %p\n", data);
      abort ();
    }

  model = state->model;
  CHECK (model, g_atomic_int_add (&model->key_live_states[state->key], -1) == 1,
         "key %u: freed a state that was not its live one", state->key);
  g_atomic_int_inc (&model->states_freed);
  state->magic = STATE_DEAD;
  g_free (state);
}

static void
model_handler_data_free (gpointer data)
{
  g_atomic_int_inc (&((KdModel *) data)->handler_data_freed);
}

static void
model_done_data_free (gpointer data)
{
  g_atomic_int_inc (&((KdModel *) data)->done_data_freed);
}

static void
model_state_data_free (gpointer data)
{
  g_atomic_int_inc (&((KdModel *) data)->state_data_freed);
}

/* ------------------------------------------------------------------------ */
/* References                                                               */

/* Drops @thread's reference. The holder that drops the last one waits for
 * the others' unrefs to have returned (they never block: the dispatcher
 * lives on), checks the counters, then makes the last unref. */
void
kd_model_drop_ref (ModelThread *thread,
                   gboolean     wait_first)
{
  KdModel *model = thread->model;
  KdDispatcher *dispatcher;
  guint holders = model->program->n_threads + 1;

  /* The callbacks hold references: they run before this one goes, so that
   * the model's last holder holds the last reference. */
  if (thread->context != NULL)
    kd_model_drain_async (thread);
  dispatcher = g_steal_pointer (&thread->dispatcher);

  if (!g_atomic_int_dec_and_test (&model->refs))
    {
      g_object_unref (dispatcher);
      kd_test_counter_add (&model->unrefs_done, 1);
      return;
    }

  CHECK (model, kd_test_counter_wait (&model->unrefs_done, holders - 1),
         "the other holders' unrefs did not return");
  /* A huge retry delay ends only with a cancel: the janitor's, while the
   * last holder waits. */
  if (model->program->retry_huge)
    wait_first = TRUE;
  if (wait_first)
    kd_dispatcher_wait (dispatcher);
  janitor_stop (model);
  kd_model_check_last_stats (model, dispatcher, wait_first);

  g_atomic_int_set (&model->last_unref_started, 1);
  g_object_unref (dispatcher);
  kd_model_check_after_last_unref (model);
}

/* ------------------------------------------------------------------------ */
/* Running a program                                                        */

/* Per-item choices, fixed by the program: whether it fails, how long its
 * handler takes. */
static void
setup_items (KdModel *model)
{
  const KdModelProgram *program = model->program;
  guint i, j;

  for (i = 0; i < program->n_ops; i++)
    {
      const KdModelOp *op = &program->ops[i];

      if (op->count == 0)
        continue;
      for (j = 0; j < op->count; j++)
        {
          guint id = op->first_item + j;
          KdModelItem *item = &model->items[id];
          guint32 hash = mix32 (id * 0x9e3779b9u ^ ((guint32) op->duration << 8) ^ op->fail_rate);

          item->id = id;
          item->key = op->key;
          if (kd_model_op_is_batch (op))
            {
              /* Two keys (or one and none) interleaved in one call; a
               * batch of the op's key none is all unkeyed. */
              item->batch = i + 1;
              item->batch_index = j;
              if (j % 2 == 1 && op->key != program->n_keys)
                item->key = (op->key + 1) % (program->n_keys + 1);
            }
          item->fail = (hash & 7) < op->fail_rate;
          /* With retries, most failing items succeed on a later attempt. */
          if (!item->fail)
            item->fail_attempts = 0;
          else if (program->max_attempts == 1 || (hash >> 20) % 4 == 0)
            item->fail_attempts = G_MAXUINT;
          else
            item->fail_attempts = 1 + (hash >> 22) % program->max_attempts;
          /* A quarter of the items are deferred by their handlers. */
          item->deferred = (hash >> 28) % 4 == 0;
          switch (op->duration % 4)
            {
            case 1:
              item->yield = TRUE;
              break;
            case 2:
              item->spin = (hash >> 8) % 200;
              break;
            case 3:
              item->spin = (hash >> 8) % 4000;
              break;
            default:
              break;
            }
        }
    }

  /* The main thread's first submit, with a main context: unkeyed, quick. */
  model->items[program->n_items].id = program->n_items;
  model->items[program->n_items].key = program->n_keys;
}

static gpointer
model_thread_main (gpointer data)
{
  ModelThread *thread = data;
  KdModel *model = thread->model;
  const KdModelProgram *program = model->program;
  guint i;

  thread->context = g_main_context_new ();
  g_main_context_push_thread_default (thread->context);
  CHECK (model, kd_test_gate_wait (&model->start), "the start gate never opened");
  for (i = 0; i < program->n_ops; i++)
    {
      const KdModelOp *op = &program->ops[i];

      if (op->thread != thread->index)
        continue;
      g_atomic_int_set (&thread->at_op, (gint) i);
      if (!kd_model_run_op (thread, op))
        break;
    }
  g_atomic_int_set (&thread->at_op, -1);

  if (thread->dispatcher != NULL)
    kd_model_drop_ref (thread, program->last_waits);
  g_main_context_pop_thread_default (thread->context);
  g_clear_pointer (&thread->context, g_main_context_unref);
  kd_test_counter_add (&model->finished, 1);

  return NULL;
}

/* Another user of the program's cancellable, connected before the
 * dispatcher: its handler runs first and takes a while. */
static void
slow_cancelled (GCancellable *cancellable,
                gpointer      user_data)
{
  guint i;

  for (i = 0; i < 20; i++)
    {
      g_thread_yield ();
      kd_test_spin (500);
    }
}

/* The application's main loop. It does not push the context as its
 * thread's default: a last unref may own the context for a moment to flush
 * the deliveries (kd_delivery_flush()), and an iteration waits for it. */
static gpointer
loop_thread_main (gpointer data)
{
  KdModel *model = data;

  kd_test_gate_open (&model->loop_running);
  while (!g_atomic_int_get (&model->loop_stop))
    g_main_context_iteration (model->context, TRUE);

  return NULL;
}

static void G_GNUC_NORETURN
model_hung (KdModel *model)
{
  char *description = kd_model_program_describe (model->program);
  guint i;

  g_printerr ("kd-model: the program made no progress for %d s\n%s",
              (gint) (KD_TEST_DEADLINE_US / G_TIME_SPAN_SECOND), description);
  for (i = 0; i < model->program->n_threads; i++)
    g_printerr ("kd-model: thread %u at op %d\n", i, g_atomic_int_get (&model->threads[i].at_op));
  kd_mutex_lock (&model->lock);
  g_printerr ("kd-model: %d violations so far\n%s", model->n_violations, model->report->str);
  kd_mutex_unlock (&model->lock);
  abort ();
}

static void
drop_message (const char     *domain,
              GLogLevelFlags  level,
              const char     *message,
              gpointer        user_data)
{
}

void
kd_model_quiet_debug (void)
{
  if (g_getenv ("G_MESSAGES_DEBUG") == NULL)
    g_log_set_handler ("kdispatch", G_LOG_LEVEL_DEBUG, drop_message, NULL);
}

void
kd_model_set_fatal (gboolean fatal)
{
  model_fatal = fatal;
}

gboolean
kd_model_run (const KdModelProgram *program,
              KdModelResult        *result)
{
  KdModel *model = g_new0 (KdModel, 1);
  KdDispatcher *dispatcher;
  ModelThread *main_thread;
  guint i;

  model->program = program;
  model->n_keys = program->n_keys;
  model->max_workers = (gint) program->n_workers;
  model->clock = 16;
  model->refs = (gint) program->n_threads + 1;
  model->n_items = program->n_items;
  model->report = g_string_new (NULL);
  model->known = g_string_new (NULL);
  model->strict = g_strcmp0 (g_getenv ("KD_MODEL_STRICT"), "1") == 0;
  g_mutex_init (&model->lock);
  g_mutex_init (&model->iterate_lock);
  g_cond_init (&model->iterate_turn);
  kd_test_counter_init (&model->unrefs_done);
  kd_test_counter_init (&model->finished);
  kd_test_gate_init (&model->start);
  kd_test_gate_init (&model->loop_running);
  setup_items (model);

  dispatcher = kd_dispatcher_new (program->n_workers, model_handler, model,
                                  model_handler_data_free);
  kd_dispatcher_set_fanout (dispatcher, program->fanout);
  kd_dispatcher_set_capacity (dispatcher, program->capacity);
  kd_dispatcher_set_item_free (dispatcher, model_item_free);
  if (!program->no_done)
    kd_dispatcher_set_done_func (dispatcher, model_done, model, model_done_data_free);
  if (program->key_states)
    kd_dispatcher_set_key_state_funcs (dispatcher, model_state_new, model_state_free,
                                       model, model_state_data_free);
  if (program->own_cancellable)
    {
      model->cancellable = g_cancellable_new ();
      if (program->pre_cancelled)
        {
          /* Cancelled before anything: every tick is later. */
          g_cancellable_cancel (model->cancellable);
          model->close_started = model->cancel_started = 1;
          model->closed_by = model->cancelled_by = 2;
        }
      if (program->shared_cancel)
        g_signal_connect (model->cancellable, "cancelled", G_CALLBACK (slow_cancelled), model);
      kd_dispatcher_set_cancellable (dispatcher, model->cancellable);
    }
  if (program->context_mode != KD_MODEL_CONTEXT_NONE)
    {
      model->context = g_main_context_new ();
      kd_dispatcher_set_main_context (dispatcher, model->context);
    }
  if (program->max_attempts > 1)
    kd_dispatcher_set_retry (dispatcher, program->max_attempts, program->retry_delay_us,
                             program->retry_max_delay_us);
  if (program->dead_letter)
    kd_dispatcher_set_dead_letter_func (dispatcher, model_dead_letter, model,
                                        model_dead_letter_data_free);
  if (program->park)
    kd_dispatcher_set_failure_policy (dispatcher, KD_FAILURE_PARK);
  if (program->key_capacity > 0)
    kd_dispatcher_set_key_capacity (dispatcher, program->key_capacity);
  if (program->key_idle_us > 0)
    kd_dispatcher_set_key_idle_time (dispatcher, program->key_idle_us);
  if (program->max_idle_keys > 0)
    kd_dispatcher_set_max_idle_keys (dispatcher, program->max_idle_keys);
  if (program->max_waiting > 0)
    kd_dispatcher_set_max_waiting (dispatcher, program->max_waiting);
  if (program->worker_idle_us > 0)
    kd_dispatcher_set_worker_idle_time (dispatcher, program->worker_idle_us, program->min_workers);
  if (program->worker_funcs)
    {
      GError *error = NULL;

      kd_dispatcher_set_worker_funcs (dispatcher, model_worker_init, model_worker_finalize,
                                      model, model_worker_data_free);
      if (program->start && program->pre_cancelled)
        {
          CHECK (model, !kd_dispatcher_start (dispatcher, &error) &&
                        g_error_matches (error, KD_ERROR, KD_ERROR_CLOSED),
                 "start of a cancelled dispatcher: %s", error != NULL ? error->message : "no error");
          g_clear_error (&error);
        }
      else if (program->start)
        {
          CHECK (model, kd_dispatcher_start (dispatcher, &error), "start failed: %s",
                 error != NULL ? error->message : "no error");
          g_clear_error (&error);
          for (i = 0; i < program->n_workers; i++)
            CHECK (model, g_atomic_int_get (&model->worker_inits[i]) == 1,
                   "worker %u: no init when start returned", i);
        }
    }
  model->dispatcher = dispatcher;

  for (i = 0; i <= program->n_threads; i++)
    {
      ModelThread *thread = &model->threads[i];

      thread->model = model;
      thread->index = i;
      thread->at_op = -1;
      thread->dispatcher = i == program->n_threads ? dispatcher : g_object_ref (dispatcher);
    }
  main_thread = &model->threads[program->n_threads];

  /* With a main context, the main thread submits first: the first submit
   * attaches the dispatcher's sources (deliveries, property notifies) to
   * the context, and then another thread dispatches them. GLib orders the
   * two with the context's lock, which ThreadSanitizer cannot see; threads
   * started after the attach are ordered by their start, which it can. */
  if (program->context_mode != KD_MODEL_CONTEXT_NONE)
    {
      model->n_items++;
      kd_model_submit_one (main_thread, program->n_items);
    }
  if (program->context_mode == KD_MODEL_CONTEXT_LOOP)
    {
      model->loop_thread = g_thread_new ("model-loop", loop_thread_main, model);
      CHECK (model, kd_test_gate_wait (&model->loop_running), "the loop thread never started");
    }
  if (program->park || program->retry_huge)
    janitor_start (model);

  returner_start (model);
  for (i = 0; i < program->n_threads; i++)
    model->threads[i].thread = g_thread_new ("model-thread", model_thread_main, &model->threads[i]);

  /* Dropped before the start, the main thread's reference is never the
   * last: a thread of the program drops it, maybe while others submit. */
  if (!program->main_keeps_ref)
    kd_model_drop_ref (main_thread, FALSE);

  kd_test_gate_open (&model->start);
  if (!kd_test_counter_wait (&model->finished, program->n_threads))
    model_hung (model);
  for (i = 0; i < program->n_threads; i++)
    g_thread_join (model->threads[i].thread);

  if (program->main_keeps_ref)
    kd_model_drop_ref (main_thread, TRUE);
  /* The last unref returned: every deferred job ended. */
  returner_stop (model);

  if (model->loop_thread != NULL)
    {
      g_atomic_int_set (&model->loop_stop, 1);
      g_main_context_wakeup (model->context);
      g_thread_join (model->loop_thread);
    }

  janitor_stop (model);
  CHECK (model, model->last_unref_checked, "nobody made the last unref");
  kd_model_check_items (model);

  kd_model_count_items (model, result);
  result->key_states = (guint64) model->states_made;
  result->parks = (guint64) model->n_parks;
  result->drops = (guint64) model->n_drops;
  result->n_violations = (guint) model->n_violations;
  if (model->n_violations > 0)
    {
      if (model->n_violations > MAX_REPORTED)
        g_string_append_printf (model->report, "... %d more\n",
                                model->n_violations - MAX_REPORTED);
      result->report = g_string_free (g_steal_pointer (&model->report), FALSE);
    }
  else
    {
      g_string_free (g_steal_pointer (&model->report), TRUE);
    }
  result->n_known = (guint) model->n_known;
  if (model->n_known > 0)
    result->known = g_string_free (g_steal_pointer (&model->known), FALSE);
  else
    g_string_free (g_steal_pointer (&model->known), TRUE);

  for (i = 0; i < KD_MODEL_MAX_KEYS; i++)
    g_clear_pointer (&model->drop_ticks[i], g_array_unref);
  g_clear_object (&model->cancellable);
  janitor_clear (model);
  if (model->context != NULL)
    g_main_context_unref (model->context);
  kd_test_gate_clear (&model->start);
  kd_test_gate_clear (&model->loop_running);
  kd_test_counter_clear (&model->unrefs_done);
  kd_test_counter_clear (&model->finished);
  g_mutex_clear (&model->lock);
  g_mutex_clear (&model->iterate_lock);
  g_cond_clear (&model->iterate_turn);
  g_free (model);

  return result->n_violations == 0;
}

gboolean
kd_model_run_bytes (const guint8  *data,
                    gsize          size,
                    KdModelResult *result)
{
  KdModelProgram *program = g_new (KdModelProgram, 1);
  gboolean ok;

  kd_model_program_decode (program, data, size);
  ok = kd_model_run (program, result);
  g_free (program);

  return ok;
}

void
kd_model_result_clear (KdModelResult *result)
{
  g_clear_pointer (&result->report, g_free);
  g_clear_pointer (&result->known, g_free);
}

static guint64
splitmix64 (guint64 *state)
{
  guint64 z = (*state += G_GUINT64_CONSTANT (0x9e3779b97f4a7c15));

  z = (z ^ (z >> 30)) * G_GUINT64_CONSTANT (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * G_GUINT64_CONSTANT (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

guint8 *
kd_model_seed_bytes (guint64  seed,
                     gsize   *size)
{
  guint64 state = seed;
  gsize n = 64 + splitmix64 (&state) % 961;
  guint8 *bytes = g_malloc (n);
  gsize i;

  for (i = 0; i < n; i++)
    bytes[i] = (guint8) (splitmix64 (&state) >> 56);
  *size = n;

  return bytes;
}
