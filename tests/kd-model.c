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
 *  - when wait() returns, every item accepted before it was called (by any
 *    thread: its submit returned before the wait began) has ended: its done
 *    callback and item_free ran, or with a main context its handler is over;
 *  - every stats snapshot: submitted == completed + failed + cancelled +
 *    pending, counters that only grow, at least the calling thread's own
 *    accepted and refused submits.
 *
 * And at the end of the run, the checks of kd-model-checks.c.
 *
 * Threads never sleep to wait for each other: the start is a gate, the end a
 * counter, and handlers take their time with busy loops or
 * g_thread_yield().
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
  guint key;

  if (item == NULL)
    return TRUE;

  key = item->key;
  CHECK (model, g_atomic_int_add (&item->handler_runs, 1) == 0,
         "item %u: handler ran twice", item->id);
  CHECK (model, key_index (model, kd_job_get_key (job)) == key,
         "item %u: handler sees key \"%s\", submitted with \"%s\"", item->id,
         kd_job_get_key (job) != NULL ? kd_job_get_key (job) : "(null)",
         key_name (model, key) != NULL ? key_name (model, key) : "(null)");
  g_atomic_int_set (&item->run_tick, kd_model_tick (model));

  if (key < model->n_keys)
    {
      exclusive = g_atomic_int_compare_and_exchange (&model->key_running[key], 0, 1);
      CHECK (model, exclusive, "item %u: a handler of key %u was already running", item->id, key);
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

  if (exclusive)
    g_atomic_int_set (&model->key_running[key], 0);
  g_atomic_int_set (&item->handler_returned, 1);

  if (item->fail)
    {
      g_set_error (error, model_error_quark (), (gint) item->id, "item %u failed", item->id);
      return FALSE;
    }
  return TRUE;
}

static void
model_done (KdJob        *job,
            const GError *error,
            gpointer      user_data)
{
  KdModel *model = user_data;
  KdModelItem *item = token_item (model, kd_job_get_item (job), G_STRLOC);

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

  if (g_atomic_int_get (&item->handler_runs) == 0)
    CHECK (model, g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED),
           "item %u never ran but ends with %s", item->id,
           error != NULL ? error->message : "no error");
  else if (item->fail)
    CHECK (model, g_error_matches (error, model_error_quark (), (gint) item->id),
           "item %u failed but ends with %s", item->id,
           error != NULL ? error->message : "no error");
  else
    CHECK (model, error == NULL, "item %u completed but ends with %s", item->id,
           error != NULL ? error->message : "");
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
  KdDispatcher *dispatcher = g_steal_pointer (&thread->dispatcher);
  guint holders = model->program->n_threads + 1;

  if (!g_atomic_int_dec_and_test (&model->refs))
    {
      g_object_unref (dispatcher);
      kd_test_counter_add (&model->unrefs_done, 1);
      return;
    }

  CHECK (model, kd_test_counter_wait (&model->unrefs_done, holders - 1),
         "the other holders' unrefs did not return");
  if (wait_first)
    kd_dispatcher_wait (dispatcher);
  kd_model_check_last_stats (model, dispatcher, wait_first);

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
          item->fail = (hash & 7) < op->fail_rate;
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
  model->clock = 16;
  model->refs = (gint) program->n_threads + 1;
  model->n_items = program->n_items;
  model->report = g_string_new (NULL);
  model->known = g_string_new (NULL);
  model->strict = g_strcmp0 (g_getenv ("KD_MODEL_STRICT"), "1") == 0;
  g_mutex_init (&model->lock);
  g_mutex_init (&model->iterate_lock);
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

  if (model->loop_thread != NULL)
    {
      g_atomic_int_set (&model->loop_stop, 1);
      g_main_context_wakeup (model->context);
      g_thread_join (model->loop_thread);
    }

  CHECK (model, model->last_unref_checked, "nobody made the last unref");
  kd_model_check_items (model);

  kd_model_count_items (model, result);
  result->key_states = (guint64) model->states_made;
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

  g_clear_object (&model->cancellable);
  if (model->context != NULL)
    g_main_context_unref (model->context);
  kd_test_gate_clear (&model->start);
  kd_test_gate_clear (&model->loop_running);
  kd_test_counter_clear (&model->unrefs_done);
  kd_test_counter_clear (&model->finished);
  g_mutex_clear (&model->lock);
  g_mutex_clear (&model->iterate_lock);
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
