/* kd-model-ops.c: the model's operations and its program format
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * The one table of operations (op_table): each has a name, a weight (the
 * share of selector bytes that pick it), a decode function that reads its
 * operands, a run function that calls the dispatcher from a model thread
 * and checks what it returned, and a describe function for the program's
 * printout. A new operation is a new row: what it does to items is
 * recorded in their KdModelItem, which the checks of kd-model.c read.
 */

#include "config.h"

#include <string.h>

#include "kd-model-private.h"

static const guint capacities[] = { 1, 2, 3, 4, 8, 16, 64, 1024 };
static const guint fail_rates[] = { 0, 0, 0, 1, 1, 2, 4, 8 };   /* in eighths */
static const gint64 timeouts_us[] = { 0, 100, 2000, 50000 };
static const gint64 retry_delays_us[] = { 0, 20, 100, 500 };
static const gint64 idle_times_us[] = { 100, 1000, 5000, 20000 };
/* Idle workers' exit: mostly off. */
static const gint64 worker_idle_times_us[] = { 0, 0, 0, 0, 0, 50, 500, 3000 };

typedef struct
{
  const guint8 *data;
  gsize         size;
  gsize         pos;
} Reader;

static guint8
read_byte (Reader *reader)
{
  return reader->pos < reader->size ? reader->data[reader->pos++] : (reader->pos++, 0);
}

typedef struct
{
  const char *name;
  guint       weight;   /* out of the table's total; the selector byte picks */
  /* Reads the op's operands; returns FALSE to drop the op. */
  gboolean  (*decode) (Reader *reader, KdModelProgram *program, KdModelOp *op);
  /* Runs it on @thread; returns FALSE when the thread is done with the
   * dispatcher (it dropped its reference). @variant is the row's. */
  gboolean  (*run)    (ModelThread *thread, const KdModelOp *op, guint variant);
  /* Appends the operands to a description. */
  void      (*describe) (GString *out, const KdModelProgram *program, const KdModelOp *op);
  /* Tells rows that share a run function apart (which submit call). */
  guint       variant;
} OpClass;

static gboolean
decode_submit (Reader         *reader,
               KdModelProgram *program,
               KdModelOp      *op)
{
  guint count;

  op->key = read_byte (reader) % (program->n_keys + 1);
  op->duration = read_byte (reader);
  op->fail_rate = fail_rates[read_byte (reader) % G_N_ELEMENTS (fail_rates)];
  count = 1 + read_byte (reader) % 16;
  count = MIN (count, KD_MODEL_MAX_ITEMS - program->n_items);
  if (count == 0)
    return FALSE;
  op->count = (guint8) count;
  op->first_item = program->n_items;
  program->n_items += count;
  return TRUE;
}

static gboolean
decode_submit_timeout (Reader         *reader,
                       KdModelProgram *program,
                       KdModelOp      *op)
{
  if (!decode_submit (reader, program, op))
    return FALSE;
  op->arg = read_byte (reader) % G_N_ELEMENTS (timeouts_us);
  return TRUE;
}

static void
describe_submit (GString              *out,
                 const KdModelProgram *program,
                 const KdModelOp      *op)
{
  static const char *const durations[] = { "none", "yield", "short", "long" };

  if (op->key < program->n_keys)
    g_string_append_printf (out, " key=%u", op->key);
  else
    g_string_append (out, " unkeyed");
  g_string_append_printf (out, " items=%u..%u fail=%u/8 duration=%s", op->first_item,
                          op->first_item + op->count - 1, op->fail_rate,
                          durations[op->duration % 4]);
}

static void
describe_submit_after (GString              *out,
                       const KdModelProgram *program,
                       const KdModelOp      *op)
{
  describe_submit (out, program, op);
  g_string_append_printf (out, " delay=%" G_GINT64_FORMAT "us", timeouts_us[op->arg]);
}

static void
describe_submit_timeout (GString              *out,
                         const KdModelProgram *program,
                         const KdModelOp      *op)
{
  describe_submit (out, program, op);
  g_string_append_printf (out, " timeout=%" G_GINT64_FORMAT "us", timeouts_us[op->arg]);
}

/* The model's side of a submit that took @item. */
static void
note_accepted (ModelThread *thread,
               KdModelItem *item)
{
  KdModel *model = thread->model;

  thread->accepted++;
  g_atomic_int_set (&item->status, ITEM_ACCEPTED);
  /* A delayed item counts against its key's bound from its due time, which
   * the model does not see: it never counts it (the model's count is then a
   * lower bound, and its checks of the key's bound still hold). */
  if (item->how == HOW_AFTER)
    g_atomic_int_set (&item->pending_counted, 2);
  else if (item->key < model->n_keys &&
           g_atomic_int_compare_and_exchange (&item->pending_counted, 0, 1))
    g_atomic_int_inc (&model->key_pending[item->key]);
}

/* ... and of one that refused it: @token is still ours, untouched. */
static void
note_refused (ModelThread *thread,
              KdModelItem *item,
              Token       *token)
{
  CHECK (thread->model, token->magic == TOKEN_LIVE, "item %u: refused but freed", item->id);
  g_free (token);
  thread->refused++;
  g_atomic_int_set (&item->status, ITEM_REFUSED);
}

static gboolean
run_submits (ModelThread     *thread,
             const KdModelOp *op,
             guint            how)
{
  KdModel *model = thread->model;
  guint i;

  for (i = 0; i < op->count; i++)
    {
      KdModelItem *item = &model->items[op->first_item + i];
      Token *token = g_new (Token, 1);
      char buffer[128];
      const char *key = NULL;
      GError *error = NULL;
      gboolean accepted;
      gint before, after;

      token->magic = TOKEN_LIVE;
      token->model = model;
      token->item = item;
      item->how = how;

      /* The dispatcher must copy the key: the buffer is scribbled over as
       * soon as the call returns. */
      if (item->key < model->n_keys)
        {
          g_strlcpy (buffer, kd_model_keys[item->key], sizeof buffer);
          key = buffer;
        }

      if (item->key < model->n_keys)
        g_atomic_int_inc (&model->key_submitting[item->key]);
      before = kd_model_tick (model);
      g_atomic_int_set (&item->before, before);
      switch (how)
        {
        case HOW_SUBMIT:
          accepted = kd_dispatcher_submit (thread->dispatcher, key, token, &error);
          break;
        case HOW_TRY:
          accepted = kd_dispatcher_try_submit (thread->dispatcher, key, token, &error);
          break;
        case HOW_GROUP:
          accepted = kd_group_submit (thread->group, key, token, &error);
          break;
        case HOW_AFTER:
          item->due_us = g_get_monotonic_time () + timeouts_us[op->arg];
          accepted = kd_dispatcher_submit_at (thread->dispatcher, key, token, item->due_us,
                                              &error);
          break;
        case HOW_TIMEOUT:
        default:
          accepted = kd_dispatcher_submit_timeout (thread->dispatcher, key, token,
                                                   timeouts_us[op->arg], &error);
          break;
        }
      after = kd_model_tick (model);
      memset (buffer, 'X', sizeof buffer - 1);
      buffer[sizeof buffer - 1] = '\0';

      if (accepted)
        {
          CHECK (model, error == NULL, "item %u accepted with an error", item->id);
          g_clear_error (&error);
          note_accepted (thread, item);
        }
      else
        {
          const char *call = how == HOW_GROUP ? "group_submit" :
                             how == HOW_AFTER ? "submit_at" :
                             how == HOW_TRY ? "try_submit" :
                             how == HOW_TIMEOUT ? "submit_timeout" : "submit";
          gboolean right_code = FALSE;

          /* A fail-fast group cancelled by an earlier item's failure. */
          if (how == HOW_GROUP && g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
            {
              CHECK (model, item->group_fail_fast &&
                            g_cancellable_is_cancelled (kd_group_get_cancellable (thread->group)),
                     "item %u: its group refused it CANCELLED, not cancelled", item->id);
              g_clear_error (&error);
              item->refused_code = REFUSED_GROUP_CANCELLED;
              note_refused (thread, item, token);
              g_atomic_int_set (&item->after, after);
              if (item->key < model->n_keys)
                g_atomic_int_add (&model->key_submitting[item->key], -1);
              continue;
            }

          CHECK (model, error != NULL && error->domain == KD_ERROR,
                 "item %u refused by %s with %s", item->id, call,
                 error != NULL ? error->message : "no error");
          if (error != NULL && error->domain == KD_ERROR)
            {
              right_code = error->code == KD_ERROR_CLOSED ||
                           ((how == HOW_TRY || how == HOW_AFTER) && error->code == KD_ERROR_FULL) ||
                           (how == HOW_TIMEOUT && error->code == KD_ERROR_TIMEOUT);
              item->refused_code = error->code;
            }
          CHECK (model, right_code, "item %u: %s refused it with \"%s\"", item->id, call,
                 error != NULL ? error->message : "no error");
          g_clear_error (&error);
          note_refused (thread, item, token);
        }
      g_atomic_int_set (&item->after, after);
      if (item->key < model->n_keys)
        {
          guint key_capacity = model->program->key_capacity;

          /* Counted before the end of this submit: an item accepted is
           * pending or ended in the model before it leaves submitting. */
          if (key_capacity > 0 && kd_model_key_count_exact (model, item))
            CHECK (model, g_atomic_int_get (&model->key_pending[item->key]) <=
                          (gint) key_capacity + g_atomic_int_get (&model->key_submitting[item->key]) - 1,
                   "key %u: %d pending after a submit returned (%d others in progress) for a "
                   "key capacity of %u", item->key,
                   g_atomic_int_get (&model->key_pending[item->key]),
                   g_atomic_int_get (&model->key_submitting[item->key]) - 1, key_capacity);
          g_atomic_int_add (&model->key_submitting[item->key], -1);
        }
    }

  return TRUE;
}

#define KEY_BUFFER 128

/* The *_MANY ops: the burst's items in one call. Their keys alternate
 * between the op's key and the next one (see kd_model_op_is_batch()), or
 * all have none, and then the call gets no keys array (the dispatcher's
 * path for a batch of plain unkeyed jobs, its ring of values); the items
 * taken are a prefix, the rest refused with the call's error. */
static gboolean
run_batch (ModelThread     *thread,
           const KdModelOp *op,
           guint            how)
{
  static const char *const calls[] = { "submit_many", "try_submit_many",
                                       "submit_many_timeout" };
  KdModel *model = thread->model;
  guint key_capacity = model->program->key_capacity;
  char *buffers = g_malloc ((gsize) op->count * KEY_BUFFER);
  const char **keys = g_new0 (const char *, op->count);
  gpointer *tokens = g_new (gpointer, op->count);
  const char *call = calls[how - HOW_MANY];
  GError *error = NULL;
  guint taken, i;
  gint before, after;

  for (i = 0; i < op->count; i++)
    {
      KdModelItem *item = &model->items[op->first_item + i];
      Token *token = g_new (Token, 1);

      token->magic = TOKEN_LIVE;
      token->model = model;
      token->item = item;
      tokens[i] = token;
      item->how = how;
      /* Copied by the dispatcher: scribbled over once the call returns. */
      if (item->key < model->n_keys)
        {
          keys[i] = buffers + i * KEY_BUFFER;
          g_strlcpy (buffers + i * KEY_BUFFER, kd_model_keys[item->key], KEY_BUFFER);
          g_atomic_int_inc (&model->key_submitting[item->key]);
        }
    }

  for (i = 0; i < op->count && keys[i] == NULL; i++)
    ;
  if (i == op->count)
    g_clear_pointer (&keys, g_free);

  before = kd_model_tick (model);
  for (i = 0; i < op->count; i++)
    g_atomic_int_set (&model->items[op->first_item + i].before, before);
  switch (how)
    {
    case HOW_MANY:
      taken = kd_dispatcher_submit_many (thread->dispatcher, keys, tokens, op->count, &error);
      break;
    case HOW_TRY_MANY:
      taken = kd_dispatcher_try_submit_many (thread->dispatcher, keys, tokens, op->count,
                                             &error);
      break;
    case HOW_TIMEOUT_MANY:
    default:
      taken = kd_dispatcher_submit_many_timeout (thread->dispatcher, keys, tokens, op->count,
                                                 timeouts_us[op->arg], &error);
      break;
    }
  after = kd_model_tick (model);
  for (i = 0; i < op->count; i++)
    memset (buffers + i * KEY_BUFFER, 'X', KEY_BUFFER - 1);

  CHECK (model, taken <= op->count, "%s took %u of %u items", call, taken, op->count);
  CHECK (model, (error != NULL) == (taken < op->count),
         "%s took %u of %u items, %s", call, taken, op->count,
         error != NULL ? error->message : "without an error");
  if (error != NULL)
    {
      gboolean right_code = error->domain == KD_ERROR &&
                            (error->code == KD_ERROR_CLOSED ||
                             (error->code == KD_ERROR_FULL && how != HOW_TIMEOUT_MANY) ||
                             (error->code == KD_ERROR_TIMEOUT && how == HOW_TIMEOUT_MANY));

      CHECK (model, right_code, "items %u..: %s refused them with \"%s\"",
             op->first_item + taken, call, error->message);
    }

  for (i = 0; i < op->count; i++)
    {
      KdModelItem *item = &model->items[op->first_item + i];
      Token *token = tokens[i];

      if (i < taken)
        {
          note_accepted (thread, item);
        }
      else
        {
          if (error != NULL && error->domain == KD_ERROR)
            item->refused_code = error->code;
          note_refused (thread, item, token);
        }
      g_atomic_int_set (&item->after, after);
    }
  g_clear_error (&error);

  for (i = 0; i < op->count; i++)
    {
      KdModelItem *item = &model->items[op->first_item + i];

      if (item->key < model->n_keys)
        g_atomic_int_add (&model->key_submitting[item->key], -1);
    }
  /* As for single submits: once the call returned, a key holds at most its
   * capacity plus the submits to it still in progress elsewhere. */
  for (i = 0; i < op->count; i++)
    {
      KdModelItem *item = &model->items[op->first_item + i];

      if (key_capacity > 0 && item->key < model->n_keys && kd_model_key_count_exact (model, item))
        CHECK (model, g_atomic_int_get (&model->key_pending[item->key]) <=
                      (gint) key_capacity + g_atomic_int_get (&model->key_submitting[item->key]),
               "key %u: %d pending after %s returned (%d others in progress) for a key "
               "capacity of %u", item->key, g_atomic_int_get (&model->key_pending[item->key]),
               call, g_atomic_int_get (&model->key_submitting[item->key]), key_capacity);
    }

  g_free (tokens);
  g_free (keys);
  g_free (buffers);
  return TRUE;
}

/* What an async submission's callback is given. */
typedef struct
{
  ModelThread *thread;
  KdModelItem *item;
} AsyncCall;

/* An async submission's callback, in its thread's context. */
static void
async_done (GObject      *source,
            GAsyncResult *result,
            gpointer      user_data)
{
  AsyncCall *call = user_data;
  ModelThread *thread = call->thread;
  KdModelItem *item = call->item;
  KdModel *model = thread->model;
  Token *token = item->async_token;   /* freed already if accepted */
  GError *error = NULL;

  g_free (call);
  CHECK (model, thread->thread == g_thread_self () && thread->async_pending > 0,
         "item %u: its async callback ran on another thread", item->id);
  thread->async_pending--;

  if (!kd_dispatcher_submit_finish (KD_DISPATCHER (source), result, &error) &&
      error->domain == KD_ERROR)
    {
      /* Never accepted: the item is still ours, untouched. */
      CHECK (model, error->code == KD_ERROR_CLOSED || error->code == KD_ERROR_FULL,
             "item %u: async submission refused with \"%s\"", item->id, error->message);
      CHECK (model, token->magic == TOKEN_LIVE, "item %u: refused but freed", item->id);
      item->refused_code = error->code;
      g_free (token);
      thread->refused++;
      g_atomic_int_set (&item->status, ITEM_REFUSED);
    }
  else
    {
      /* Its job ended: completed, failed or cancelled. */
      CHECK (model, g_atomic_int_get (&item->free_calls) == 1,
             "item %u: async callback before its item was freed", item->id);
      thread->accepted++;
      g_atomic_int_set (&item->status, ITEM_ACCEPTED);
    }
  g_clear_error (&error);
  item->async_token = NULL;
  g_atomic_int_set (&item->after, kd_model_tick (model));
}

static gboolean
run_async_submits (ModelThread     *thread,
                   const KdModelOp *op,
                   guint            variant)
{
  KdModel *model = thread->model;
  guint max_waiting = kd_dispatcher_get_max_waiting (thread->dispatcher);
  guint i;

  for (i = 0; i < op->count; i++)
    {
      KdModelItem *item = &model->items[op->first_item + i];
      Token *token = g_new (Token, 1);
      AsyncCall *call = g_new (AsyncCall, 1);
      guint waiting = 0;

      token->magic = TOKEN_LIVE;
      token->model = model;
      token->item = item;
      item->how = HOW_ASYNC;
      item->async_token = token;
      g_atomic_int_set (&item->before, kd_model_tick (model));
      thread->async_pending++;
      call->thread = thread;
      call->item = item;
      kd_dispatcher_submit_async (thread->dispatcher,
                                  item->key < model->n_keys ? kd_model_keys[item->key] : NULL,
                                  token, NULL, async_done, call);
      CHECK (model, item->async_token == token, "item %u: async callback inside the call",
             item->id);
      g_object_get (thread->dispatcher, "waiting", &waiting, NULL);
      CHECK (model, waiting <= max_waiting, "%u async submissions wait, for a bound of %u",
             waiting, max_waiting);
    }

  return TRUE;
}

void
kd_model_drain_async (ModelThread *thread)
{
  while (thread->async_pending > 0)
    g_main_context_iteration (thread->context, TRUE);
}

static gboolean
decode_async_submit (Reader         *reader,
                     KdModelProgram *program,
                     KdModelOp      *op)
{
  /* A parked key's or a huge retry's callbacks could wait for ever, and
   * so could those whose items only the ITERATE op frees. */
  if (!decode_submit (reader, program, op))
    return FALSE;
  if (program->park || program->retry_huge || program->context_mode == KD_MODEL_CONTEXT_ITERATE)
    {
      program->n_items -= op->count;
      return FALSE;
    }
  return TRUE;
}

void
kd_model_submit_one (ModelThread *thread,
                     guint        item)
{
  KdModelOp op = { 0 };

  op.thread = (guint8) thread->index;
  op.count = 1;
  op.first_item = item;
  run_submits (thread, &op, HOW_SUBMIT);
}

/* After a barrier called at tick @called held at tick @held: every item
 * accepted before the call has ended (of those of @burst, a group's, if
 * not NULL; all the items otherwise). */
static void
check_waited (ModelThread     *thread,
              gint             called,
              gint             held,
              const KdModelOp *burst)
{
  KdModel *model = thread->model;
  const KdModelProgram *program = model->program;
  guint first = burst != NULL ? burst->first_item : 0;
  guint end = burst != NULL ? burst->first_item + burst->count : model->n_items;
  guint i;

  for (i = first; i < end; i++)
    {
      KdModelItem *item = &model->items[i];
      gint after = g_atomic_int_get (&item->after);
      gint cancel_started;

      if (after == 0 || after >= called || g_atomic_int_get (&item->status) != ITEM_ACCEPTED)
        continue;

      if (g_atomic_int_get (&item->handler_runs) != 0)
        CHECK (model, g_atomic_int_get (&item->handler_returned) &&
                      ((guint) g_atomic_int_get (&item->handler_runs) > item->fail_attempts ||
                       kd_model_item_failed (model, item) ||
                       g_atomic_int_get (&model->cancel_started) != 0),
               "item %u: its handler still runs or will run again after a wait held",
               item->id);
      else
        {
          cancel_started = g_atomic_int_get (&model->cancel_started);
          CHECK (model, (cancel_started != 0 && cancel_started < held) || item->group_fail_fast ||
                        (item->key < model->n_keys &&
                         g_atomic_int_get (&model->key_drops[item->key]) != 0),
                 "item %u: accepted before a wait, not run when it held, and not cancelled "
                 "or dropped", item->id);
        }

      if (program->context_mode == KD_MODEL_CONTEXT_NONE)
        {
          CHECK (model, g_atomic_int_get (&item->free_calls) == 1,
                 "item %u: accepted before a wait, not freed when it held", item->id);
          if (!program->no_done)
            CHECK (model, g_atomic_int_get (&item->done_calls) == 1,
                   "item %u: accepted before a wait, no done callback when it held", item->id);
        }
    }
}

static gboolean
run_wait (ModelThread     *thread,
          const KdModelOp *op,
          guint            variant)
{
  KdModel *model = thread->model;
  gint called;

  called = kd_model_tick (model);
  kd_dispatcher_wait (thread->dispatcher);
  check_waited (thread, called, kd_model_tick (model), NULL);

  return TRUE;
}

/* wait_until with a timeout class: it holds (and then as wait does), or it
 * gave up no earlier than its end time. */
static gboolean
run_wait_until (ModelThread     *thread,
                const KdModelOp *op,
                guint            variant)
{
  KdModel *model = thread->model;
  gint64 end_time = g_get_monotonic_time () + timeouts_us[op->arg];
  gint called = kd_model_tick (model);

  if (kd_dispatcher_wait_until (thread->dispatcher, end_time))
    check_waited (thread, called, kd_model_tick (model), NULL);
  else
    CHECK (model, g_get_monotonic_time () >= end_time,
           "wait_until gave up before its end time");

  return TRUE;
}

static gboolean
decode_wait_until (Reader         *reader,
                   KdModelProgram *program,
                   KdModelOp      *op)
{
  op->arg = read_byte (reader) % G_N_ELEMENTS (timeouts_us);
  return TRUE;
}

static void
describe_wait_until (GString              *out,
                     const KdModelProgram *program,
                     const KdModelOp      *op)
{
  g_string_append_printf (out, " timeout=%" G_GINT64_FORMAT "us", timeouts_us[op->arg]);
}

/* What an async wait's callback is given. */
typedef struct
{
  ModelThread *thread;
  gint         called;
} WaitCall;

static void
wait_async_done (GObject      *source,
                 GAsyncResult *result,
                 gpointer      user_data)
{
  WaitCall *call = user_data;
  ModelThread *thread = call->thread;
  KdModel *model = thread->model;
  GError *error = NULL;

  CHECK (model, thread->thread == g_thread_self () && thread->async_pending > 0,
         "an async wait's callback ran on another thread");
  thread->async_pending--;
  CHECK (model, kd_dispatcher_wait_finish (KD_DISPATCHER (source), result, &error),
         "an async wait failed: %s", error != NULL ? error->message : "no error");
  g_clear_error (&error);
  check_waited (thread, call->called, kd_model_tick (model), NULL);
  g_free (call);
}

static gboolean
run_wait_async (ModelThread     *thread,
                const KdModelOp *op,
                guint            variant)
{
  WaitCall *call = g_new (WaitCall, 1);

  call->thread = thread;
  call->called = kd_model_tick (thread->model);
  thread->async_pending++;
  kd_dispatcher_wait_async (thread->dispatcher, NULL, wait_async_done, call);

  return TRUE;
}

/* A group's data freed: the last thing its finalize does, after it let
 * its dispatcher go (weak references are notified earlier, at dispose). */
/* A group's jobs run at one of these priorities (op->arg >> 1). */
static const gint group_priorities[] = { G_PRIORITY_DEFAULT, G_PRIORITY_HIGH, G_PRIORITY_LOW };

/* A group's burst at a priority; fail-fast (op->arg & 1) only without
 * retries, whose cancellation while a retry waits the model does not
 * follow for groups. */
static gboolean
decode_group (Reader         *reader,
              KdModelProgram *program,
              KdModelOp      *op)
{
  guint8 byte;

  if (!decode_submit (reader, program, op))
    return FALSE;
  byte = read_byte (reader);
  op->arg = (program->max_attempts <= 1 && byte % 2 == 1) |
            ((byte >> 1) % G_N_ELEMENTS (group_priorities)) << 1;
  return TRUE;
}

static void
describe_group (GString              *out,
                const KdModelProgram *program,
                const KdModelOp      *op)
{
  describe_submit (out, program, op);
  if (op->arg & 1)
    g_string_append (out, " fail-fast");
  g_string_append_printf (out, " priority=%d", group_priorities[op->arg >> 1]);
}

static void
group_finalized (gpointer user_data)
{
  kd_test_gate_open (user_data);
}

/* Whether @item ran to completion: its last run returned and succeeded. */
static gboolean
item_completed (KdModelItem *item)
{
  return g_atomic_int_get (&item->handler_returned) &&
         (guint) g_atomic_int_get (&item->handler_runs) > item->fail_attempts;
}

/* A burst submitted through a group of its own (kd_group_submit()), then
 * the group's wait: it holds for the burst's accepted items (as wait does
 * for the dispatcher's), reports an error exactly when one of them did not
 * complete, and the group's counters are the burst's. The group is gone
 * (its jobs let it go) before the op returns, so that it never holds the
 * dispatcher's last reference. */
static gboolean
run_group (ModelThread     *thread,
           const KdModelOp *op,
           guint            variant)
{
  KdModel *model = thread->model;
  KdGroup *group = kd_group_new (thread->dispatcher);
  guint64 accepted = thread->accepted, refused = thread->refused;
  gboolean all_completed = TRUE, waited;
  GError *error = NULL;
  KdTestGate gone;
  KdStats stats;
  gint called;
  guint i;

  kd_group_set_priority (group, group_priorities[op->arg >> 1]);
  CHECK (model, kd_group_get_priority (group) == group_priorities[op->arg >> 1],
         "group: priority %d set, %d read", group_priorities[op->arg >> 1],
         kd_group_get_priority (group));
  if (op->arg & 1)
    {
      g_atomic_int_inc (&model->fail_fast_groups);
      kd_group_set_fail_fast (group, TRUE);
      for (i = op->first_item; i < op->first_item + op->count; i++)
        model->items[i].group_fail_fast = TRUE;
    }
  thread->group = group;
  run_submits (thread, op, HOW_GROUP);
  thread->group = NULL;
  accepted = thread->accepted - accepted;
  refused = thread->refused - refused;

  called = kd_model_tick (model);
  waited = kd_group_wait (group, &error);
  check_waited (thread, called, kd_model_tick (model), op);

  for (i = op->first_item; i < op->first_item + op->count; i++)
    if (g_atomic_int_get (&model->items[i].status) == ITEM_ACCEPTED &&
        !item_completed (&model->items[i]))
      all_completed = FALSE;
  CHECK (model, waited == all_completed,
         "group of items %u..%u: its wait returned %s (%s), but %s its accepted items "
         "completed", op->first_item, op->first_item + op->count - 1,
         waited ? "TRUE" : "FALSE", error != NULL ? error->message : "no error",
         all_completed ? "all" : "not all");
  CHECK (model, waited || error != NULL, "a group's wait failed without an error");
  /* Fail-fast: a failure cancelled the group, and only a failure. Its items
   * have all ended: none counts against its key any more. */
  if (op->arg & 1)
    {
      gboolean any_failed = FALSE;

      for (i = op->first_item; i < op->first_item + op->count; i++)
        if (g_atomic_int_get (&model->items[i].status) == ITEM_ACCEPTED &&
            kd_model_item_failed (model, &model->items[i]))
          any_failed = TRUE;
      CHECK (model, any_failed || !g_cancellable_is_cancelled (kd_group_get_cancellable (group)),
             "group of items %u..%u: cancelled, but none of its items failed", op->first_item,
             op->first_item + op->count - 1);
      for (i = op->first_item; i < op->first_item + op->count; i++)
        {
          if (g_atomic_int_get (&model->items[i].status) == ITEM_ACCEPTED &&
              kd_model_item_failed (model, &model->items[i]))
            CHECK (model, g_cancellable_is_cancelled (kd_group_get_cancellable (group)),
                   "item %u failed in a fail-fast group, which is not cancelled", i);
          kd_model_item_uncount (model, &model->items[i]);
        }
      g_atomic_int_add (&model->fail_fast_groups, -1);
    }
  g_clear_error (&error);

  kd_group_get_stats (group, &stats);
  CHECK (model, stats.submitted == accepted && stats.rejected == refused && stats.pending == 0 &&
                stats.completed + stats.failed + stats.cancelled == stats.submitted,
         "group of items %u..%u: submitted %" G_GUINT64_FORMAT " (the model %" G_GUINT64_FORMAT
         "), rejected %" G_GUINT64_FORMAT " (%" G_GUINT64_FORMAT "), pending %" G_GUINT64_FORMAT
         " after its wait", op->first_item, op->first_item + op->count - 1, stats.submitted,
         accepted, stats.rejected, refused, stats.pending);
  if (g_atomic_int_get (&model->cancel_started) == 0)
    {
      guint64 completed = 0;

      for (i = op->first_item; i < op->first_item + op->count; i++)
        if (g_atomic_int_get (&model->items[i].status) == ITEM_ACCEPTED &&
            item_completed (&model->items[i]))
          completed++;
      CHECK (model, stats.completed == completed,
             "group of items %u..%u: %" G_GUINT64_FORMAT " completed, the model saw %"
             G_GUINT64_FORMAT, op->first_item, op->first_item + op->count - 1, stats.completed,
             completed);
    }

  kd_test_gate_init (&gone);
  g_object_set_data_full (G_OBJECT (group), "kd-model-gone", &gone, group_finalized);
  g_object_unref (group);
  CHECK (model, kd_test_gate_wait (&gone), "a group outlived its jobs");
  kd_test_gate_clear (&gone);

  return TRUE;
}

/* As for async submissions: a parked key's or a huge retry's jobs could
 * keep the wait for ever, and so could the ITERATE op's context. */
static gboolean
decode_wait_async (Reader         *reader,
                   KdModelProgram *program,
                   KdModelOp      *op)
{
  return !(program->park || program->retry_huge ||
           program->context_mode == KD_MODEL_CONTEXT_ITERATE);
}

static gboolean
run_close (ModelThread     *thread,
           const KdModelOp *op,
           guint            variant)
{
  KdModel *model = thread->model;
  gint returned;

  kd_model_tick_min (&model->close_started, kd_model_tick (model));
  kd_dispatcher_close (thread->dispatcher);
  returned = kd_model_tick (model);
  kd_model_tick_min (&model->closed_by, returned);
  kd_model_tick_min (&model->close_returned, returned);
  return TRUE;
}

static gboolean
run_cancel (ModelThread     *thread,
            const KdModelOp *op,
            guint            variant)
{
  kd_model_cancel (thread->model, thread->dispatcher);
  return TRUE;
}

static gboolean
run_unref (ModelThread     *thread,
           const KdModelOp *op,
           guint            variant)
{
  kd_model_drop_ref (thread, thread->model->program->last_waits);
  return FALSE;
}

static gboolean
run_stats (ModelThread     *thread,
           const KdModelOp *op,
           guint            variant)
{
  KdModel *model = thread->model;
  KdStats stats;

  kd_dispatcher_get_stats (thread->dispatcher, &stats);
  kd_model_check_stats_invariant (model, &stats, "snapshot");
  CHECK (model, stats.submitted >= thread->accepted,
         "snapshot: submitted %" G_GUINT64_FORMAT " < this thread's %" G_GUINT64_FORMAT,
         stats.submitted, thread->accepted);
  CHECK (model, stats.rejected >= thread->refused,
         "snapshot: rejected %" G_GUINT64_FORMAT " < this thread's %" G_GUINT64_FORMAT,
         stats.rejected, thread->refused);
  CHECK (model, stats.running <= (guint) g_atomic_int_get (&model->max_workers),
         "snapshot: %u running on at most %d workers", stats.running,
         g_atomic_int_get (&model->max_workers));
  CHECK (model, stats.threads <= (guint) g_atomic_int_get (&model->max_workers),
         "snapshot: %u threads for at most %d workers", stats.threads,
         g_atomic_int_get (&model->max_workers));
  CHECK (model, stats.live_keys <= model->n_keys, "snapshot: %u live keys of %u",
         stats.live_keys, model->n_keys);
  if (thread->has_stats)
    {
      const KdStats *last = &thread->last_stats;

      CHECK (model, stats.submitted >= last->submitted && stats.completed >= last->completed &&
                    stats.failed >= last->failed && stats.cancelled >= last->cancelled &&
                    stats.rejected >= last->rejected,
             "snapshot: a counter went down");
    }
  thread->last_stats = stats;
  thread->has_stats = TRUE;
  return TRUE;
}

static gboolean
run_yield (ModelThread     *thread,
           const KdModelOp *op,
           guint            variant)
{
  g_thread_yield ();
  return TRUE;
}

static gboolean
run_iterate (ModelThread     *thread,
             const KdModelOp *op,
             guint            variant)
{
  KdModel *model = thread->model;

  if (model->program->context_mode != KD_MODEL_CONTEXT_ITERATE)
    {
      g_thread_yield ();
      return TRUE;
    }

  kd_model_iterate_context (model);
  return TRUE;
}

static gboolean
decode_resize (Reader         *reader,
               KdModelProgram *program,
               KdModelOp      *op)
{
  op->arg = 1 + read_byte (reader) % KD_MODEL_MAX_WORKERS;
  return TRUE;
}

static void
describe_resize (GString              *out,
                 const KdModelProgram *program,
                 const KdModelOp      *op)
{
  g_string_append_printf (out, " n-workers=%u", op->arg);
}

/* kd_dispatcher_set_n_workers() while jobs run: it succeeds unless the
 * dispatcher was closed (by a close or cancel op, which the model notes
 * before it calls). Concurrent resizes may each win, so only the range of
 * the count is checked; the other checks (order, exactly once, the
 * worker data on its own thread) hold across resizes. */
static gboolean
run_resize (ModelThread     *thread,
            const KdModelOp *op,
            guint            variant)
{
  KdModel *model = thread->model;
  GError *error = NULL;
  gint most = g_atomic_int_get (&model->max_workers);
  guint n;

  while (op->arg > most && !g_atomic_int_compare_and_exchange (&model->max_workers, most, op->arg))
    most = g_atomic_int_get (&model->max_workers);

  if (!kd_dispatcher_set_n_workers (thread->dispatcher, op->arg, &error))
    CHECK (model, g_error_matches (error, KD_ERROR, KD_ERROR_CLOSED) &&
                  g_atomic_int_get (&model->close_started) != 0,
           "resize to %u: %s", op->arg, error->message);
  g_clear_error (&error);
  n = kd_dispatcher_get_n_workers (thread->dispatcher);
  CHECK (model, n >= 1 && n <= (guint) g_atomic_int_get (&model->max_workers),
         "resize to %u: n-workers %u", op->arg, n);
  return TRUE;
}

static gboolean
decode_resume (Reader         *reader,
               KdModelProgram *program,
               KdModelOp      *op)
{
  op->key = read_byte (reader) % program->n_keys;
  op->arg = read_byte (reader) % 3 == 0;   /* a third drop */
  return TRUE;
}

static void
describe_resume (GString              *out,
                 const KdModelProgram *program,
                 const KdModelOp      *op)
{
  g_string_append_printf (out, " key=%u%s", op->key, op->arg ? " drop" : "");
}

/* Resumes or drops the key if the model saw it park (see
 * kd_model_resolve_key()); otherwise, for a key that never had a failing
 * item (so never parked), both calls return FALSE. */
static gboolean
run_resume (ModelThread     *thread,
            const KdModelOp *op,
            guint            variant)
{
  KdModel *model = thread->model;
  guint i;

  if (kd_model_resolve_key (model, thread->dispatcher, op->key, op->arg))
    return TRUE;

  for (i = 0; i < model->n_items && model->program->park; i++)
    if (model->items[i].key == op->key && model->items[i].fail_attempts > 0)
      return TRUE;
  CHECK (model, !(op->arg ? kd_dispatcher_drop_key : kd_dispatcher_resume_key) (thread->dispatcher,
                                                                               kd_model_keys[op->key]),
         "key %u never parked, but %s returned TRUE", op->key, op->arg ? "drop_key" : "resume_key");
  return TRUE;
}

/* kd_dispatcher_list_parked_keys(): a key the model saw park, and still
 * parked (the same park) after the call, is listed; the list has no
 * duplicates, no key that never parked. */
static gboolean
run_parked (ModelThread     *thread,
            const KdModelOp *op,
            guint            variant)
{
  KdModel *model = thread->model;
  gint parks[KD_MODEL_MAX_KEYS];
  gboolean parked[KD_MODEL_MAX_KEYS];
  gboolean listed[KD_MODEL_MAX_KEYS] = { FALSE };
  char **keys;
  guint i, k;

  for (k = 0; k < model->n_keys; k++)
    {
      parks[k] = g_atomic_int_get (&model->key_parks[k]);
      parked[k] = g_atomic_int_get (&model->key_parked[k]);
    }
  keys = kd_dispatcher_list_parked_keys (thread->dispatcher);
  CHECK (model, keys != NULL, "list_parked_keys returned NULL");
  for (i = 0; keys != NULL && keys[i] != NULL; i++)
    {
      for (k = 0; k < model->n_keys; k++)
        if (strcmp (keys[i], kd_model_keys[k]) == 0)
          break;
      CHECK (model, k < model->n_keys, "list_parked_keys lists an unknown key \"%s\"", keys[i]);
      if (k == model->n_keys)
        continue;
      CHECK (model, !listed[k], "list_parked_keys lists key %u twice", k);
      listed[k] = TRUE;
      CHECK (model, model->program->park, "key %u parked without PARK", k);
    }
  for (k = 0; k < model->n_keys; k++)
    if (parked[k] && g_atomic_int_get (&model->key_parked[k]) &&
        g_atomic_int_get (&model->key_parks[k]) == parks[k] &&
        g_atomic_int_get (&model->cancel_started) == 0)
      CHECK (model, listed[k], "key %u is parked but not listed", k);
  g_strfreev (keys);
  return TRUE;
}

/* The weights add up to 256, so a uniformly random selector byte picks each
 * op with probability weight/256. Close, cancel and unref are rare: each
 * ends the interesting part of a run. */
static const OpClass op_table[] = {
  { "submit",         38, decode_submit,         run_submits, describe_submit,         HOW_SUBMIT },
  { "submit_async",   24, decode_async_submit,   run_async_submits, describe_submit,   HOW_ASYNC },
  { "try_submit",     44, decode_submit,         run_submits, describe_submit,         HOW_TRY },
  { "submit_timeout", 40, decode_submit_timeout, run_submits, describe_submit_timeout, HOW_TIMEOUT },
  { "wait",           24, NULL,                  run_wait,    NULL,                    0 },
  { "stats",          12, NULL,                  run_stats,   NULL,                    0 },
  { "yield",          12, NULL,                  run_yield,   NULL,                    0 },
  { "iterate",        14, NULL,                  run_iterate, NULL,                    0 },
  { "close",           1, NULL,                  run_close,   NULL,                    0 },
  { "cancel",          1, NULL,                  run_cancel,  NULL,                    0 },
  { "unref",           6, NULL,                  run_unref,   NULL,                    0 },
  { "resume",          6, decode_resume,         run_resume,  describe_resume,         0 },
  { "parked",          4, NULL,                  run_parked,  NULL,                    0 },
  { "submit_many",     8, decode_submit,         run_batch,   describe_submit,         HOW_MANY },
  { "try_submit_many", 4, decode_submit,         run_batch,   describe_submit,         HOW_TRY_MANY },
  { "submit_many_timeout", 4, decode_submit_timeout, run_batch, describe_submit_timeout,
    HOW_TIMEOUT_MANY },
  { "wait_until",      3, decode_wait_until,     run_wait_until, describe_wait_until,   0 },
  { "wait_async",      3, decode_wait_async,     run_wait_async, NULL,                  0 },
  { "group",           2, decode_group,          run_group,   describe_group,          0 },
  { "resize",          2, decode_resize,         run_resize,  describe_resize,         0 },
  { "submit_after",    4, decode_submit_timeout, run_submits, describe_submit_after,   HOW_AFTER },
};

/* Whether @op submits its burst in one batch: its items' keys then
 * alternate between the op's key and the next one. */
gboolean
kd_model_op_is_batch (const KdModelOp *op)
{
  return op_table[op->kind].run == run_batch;
}

static guint
select_op (guint8 selector)
{
  guint total = 0, i, pick;

  for (i = 0; i < G_N_ELEMENTS (op_table); i++)
    total += op_table[i].weight;
  pick = selector % total;
  for (i = 0; i < G_N_ELEMENTS (op_table); i++)
    {
      if (pick < op_table[i].weight)
        return i;
      pick -= op_table[i].weight;
    }
  g_assert_not_reached ();
}

guint8
kd_model_op_selector (const char *name)
{
  guint selector = 0, i;

  for (i = 0; i < G_N_ELEMENTS (op_table); i++)
    {
      if (strcmp (op_table[i].name, name) == 0)
        return (guint8) selector;
      selector += op_table[i].weight;
    }
  g_return_val_if_reached (0);
}

gboolean
kd_model_run_op (ModelThread     *thread,
                 const KdModelOp *op)
{
  return op_table[op->kind].run (thread, op, op_table[op->kind].variant);
}

/* ------------------------------------------------------------------------ */
/* Programs                                                                 */

void
kd_model_program_decode (KdModelProgram *program,
                         const guint8   *data,
                         gsize           size)
{
  Reader reader = { data, size, 0 };
  guint8 flags, rare, features, retry, params;

  memset (program, 0, sizeof *program);
  program->n_workers = 1 + read_byte (&reader) % KD_MODEL_MAX_WORKERS;
  program->fanout = 1 + read_byte (&reader) % 4;
  program->capacity = capacities[read_byte (&reader) % G_N_ELEMENTS (capacities)];
  program->n_threads = 1 + read_byte (&reader) % KD_MODEL_MAX_THREADS;
  program->n_keys = 1 + read_byte (&reader) % KD_MODEL_MAX_KEYS;

  flags = read_byte (&reader);
  switch (flags & 3)
    {
    case 2:
      program->context_mode = KD_MODEL_CONTEXT_LOOP;
      break;
    case 3:
      program->context_mode = KD_MODEL_CONTEXT_ITERATE;
      break;
    default:
      program->context_mode = KD_MODEL_CONTEXT_NONE;
      break;
    }
  program->key_states = (flags & 4) != 0;
  program->main_keeps_ref = (flags & 8) != 0;
  program->last_waits = (flags & 16) != 0;
  program->own_cancellable = (flags & 32) != 0;
  program->shared_cancel = program->own_cancellable && (flags & 64) != 0;

  rare = read_byte (&reader);
  program->pre_cancelled = program->own_cancellable && (rare & 0x1f) == 0x1f;
  program->no_done = (rare & 0xe0) == 0xe0;
  program->worker_idle_us = worker_idle_times_us[(rare >> 2) & 7];
  program->min_workers = 1 + (rare >> 5) % program->n_workers;

  features = read_byte (&reader);
  retry = read_byte (&reader);
  params = read_byte (&reader);
  program->max_attempts = 1;
  if ((features & 3) >= 2)
    {
      program->max_attempts = 2 + retry % 3;
      program->retry_delay_us = retry_delays_us[(retry >> 2) % G_N_ELEMENTS (retry_delays_us)];
      program->retry_max_delay_us = 2 * program->retry_delay_us;
      /* Rarely a delay only a cancel ends (the janitor's, kd-model.c) */
      if ((features & 3) == 3 && (retry & 0xe0) == 0xe0)
        program->retry_delay_us = program->retry_max_delay_us = 30 * G_TIME_SPAN_SECOND;
      program->retry_huge = program->retry_delay_us > G_TIME_SPAN_SECOND;
    }
  program->dead_letter = (features & 4) != 0;
  /* PARK needs the done callbacks: they tell the model a key parked */
  program->park = (features & 8) != 0 && !program->no_done;
  if (features & 16)
    program->key_capacity = 1 + params % 4;
  if (features & 32)
    {
      program->key_idle_us = idle_times_us[(params >> 2) % G_N_ELEMENTS (idle_times_us)];
      /* Often fewer idle keys allowed than the program has keys. */
      program->max_idle_keys = (params >> 4) % 4;
    }
  program->max_waiting = (params >> 6) % 4;
  program->worker_funcs = (features & 64) != 0;
  program->start = program->worker_funcs && (features & 128) != 0;

  while (reader.pos < reader.size && program->n_ops < KD_MODEL_MAX_OPS)
    {
      KdModelOp *op = &program->ops[program->n_ops];
      const OpClass *op_class;

      memset (op, 0, sizeof *op);
      op->kind = (guint8) select_op (read_byte (&reader));
      op->thread = read_byte (&reader) % program->n_threads;
      op_class = &op_table[op->kind];
      if (op_class->decode != NULL && !op_class->decode (&reader, program, op))
        continue;
      program->n_ops++;
    }
}

char *
kd_model_program_describe (const KdModelProgram *program)
{
  static const char *const contexts[] = { "none", "loop", "iterate" };
  GString *out = g_string_new (NULL);
  guint i;

  g_string_append_printf (out, "workers=%u fanout=%u capacity=%u threads=%u keys=%u "
                          "context=%s%s%s%s%s%s%s%s; %u ops, %u items\n"
                          "  attempts=%u delay=%" G_GINT64_FORMAT "us..%" G_GINT64_FORMAT "us%s%s "
                          "key-capacity=%u idle=%" G_GINT64_FORMAT "us max-idle=%u max-waiting=%u%s%s "
                          "worker-idle=%" G_GINT64_FORMAT "us min-workers=%u\n",
                          program->n_workers, program->fanout, program->capacity,
                          program->n_threads, program->n_keys, contexts[program->context_mode],
                          program->key_states ? " key-states" : "",
                          program->main_keeps_ref ? " main-keeps-ref" : "",
                          program->last_waits ? " last-waits" : "",
                          program->own_cancellable ? " own-cancellable" : "",
                          program->pre_cancelled ? " pre-cancelled" : "",
                          program->shared_cancel ? " shared-cancel" : "",
                          program->no_done ? " no-done" : "",
                          program->n_ops, program->n_items,
                          program->max_attempts, program->retry_delay_us,
                          program->retry_max_delay_us, program->dead_letter ? " dead-letter" : "",
                          program->park ? " park" : "", program->key_capacity,
                          program->key_idle_us, program->max_idle_keys, program->max_waiting,
                          program->worker_funcs ? " worker-funcs" : "",
                          program->start ? " start" : "", program->worker_idle_us,
                          program->min_workers);
  for (i = 0; i < program->n_ops; i++)
    {
      const KdModelOp *op = &program->ops[i];
      const OpClass *op_class = &op_table[op->kind];

      g_string_append_printf (out, "  %3u: thread %u %s", i, op->thread, op_class->name);
      if (op_class->describe != NULL)
        op_class->describe (out, program, op);
      g_string_append_c (out, '\n');
    }

  return g_string_free (out, FALSE);
}
