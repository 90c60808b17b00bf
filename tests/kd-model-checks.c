/* kd-model-checks.c: what the model checks of a whole run
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * At the end of a run (kd-model.c checks what happens as it happens):
 *
 *  - the holder of the last reference (a random thread of the program, or
 *    the main thread) checks the stats against the model's counts: after a
 *    wait, submitted, completed, failed, cancelled and rejected equal the
 *    model's, pending, running and live_keys are 0 and every key state made
 *    was freed; without a wait, submitted and rejected equal the model's.
 *    When its last unref returns, every accepted item's done callback and
 *    item_free ran, every destroy notify ran once, no kdispatch thread is
 *    left;
 *  - every accepted item ended exactly once, no refused item was touched;
 *  - per key, for two items x and y where x's submit returned before y's
 *    submit was called (always the case for one thread's own submits, and
 *    for any two threads when the calls did not overlap): x's handler ran
 *    before y's, x's done callback ran before y's, and if y ran then x ran
 *    (cancellation hands back a suffix of a key's queue, never a hole). The
 *    order of two submits that overlapped in time is whichever the
 *    dispatcher accepted first, which the model cannot see, so it does not
 *    check it. Within one batch (kd_dispatcher_submit_many()), an item
 *    comes before those after it in the array. A delayed item
 *    (kd_dispatcher_submit_at()) takes its place at its due time, which
 *    the model does not see: it is left out of this order, and its handler
 *    checks that it runs no earlier than its due time;
 *  - no submit called after a close() or cancel returned was accepted, and
 *    such a refusal is CLOSED even when the bound is also reached; a CLOSED
 *    refusal only after some close, cancel or pre-cancelled cancellable; no
 *    FULL or TIMEOUT when the program has fewer items than the capacity; an
 *    item that never ran only if the dispatcher was cancelled or its key
 *    parked;
 *  - with retries, the per-key order is of whole items: x's last attempt
 *    returned before y's first started; with PARK (and done callbacks on
 *    the workers) y's first attempt starts after x's done callback
 *    returned when x failed; an item queued when its key was dropped never
 *    runs;
 *  - stats: retried counts the runs after the first (more only with a
 *    cancel: a retry scheduled, then cancelled); after a wait, live keys
 *    are the parked ones and key states left live are at most those (or,
 *    with an idle time, the idle keys are at most the bound on them); after
 *    the last unref, every worker's init and
 *    finalize ran as often, the dead-letter and worker destroy notifies
 *    once.
 */

#include "config.h"

#include <string.h>
#include <unistd.h>

#include "kd-model-private.h"

void
kd_model_count_items (KdModel       *model,
                      KdModelResult *counts)
{
  guint i;

  guint runs;

  memset (counts, 0, sizeof *counts);
  for (i = 0; i < model->n_items; i++)
    {
      KdModelItem *item = &model->items[i];
      gint status = g_atomic_int_get (&item->status);

      if (status == ITEM_REFUSED)
        {
          counts->refused++;
          if (item->refused_code == KD_ERROR_CLOSED)
            counts->refused_closed++;
        }
      if (status != ITEM_ACCEPTED)
        continue;
      counts->accepted++;
      runs = (guint) g_atomic_int_get (&item->handler_runs);
      if (runs > 1)
        counts->retried += runs - 1;
      counts->dead_letters += (guint64) g_atomic_int_get (&item->dead_letters);
      if (runs == 0)
        counts->cancelled++;
      else if (runs > item->fail_attempts)
        counts->completed++;
      else if (kd_model_item_failed (model, item))
        counts->failed++;
      else
        counts->cancelled++;   /* cancelled while it waited for a retry */
    }
}

void
kd_model_check_stats_invariant (KdModel       *model,
                                const KdStats *stats,
                                const char    *where)
{
  CHECK (model, stats->submitted == stats->completed + stats->failed + stats->cancelled + stats->pending,
         "%s: submitted %" G_GUINT64_FORMAT " != completed %" G_GUINT64_FORMAT " + failed %"
         G_GUINT64_FORMAT " + cancelled %" G_GUINT64_FORMAT " + pending %" G_GUINT64_FORMAT,
         where, stats->submitted, stats->completed, stats->failed, stats->cancelled, stats->pending);
}

/* After the last unref, when every done callback ran: how the jobs ended,
 * by the counters read after wait(), against what the model saw. */
static void
check_endings (KdModel *model)
{
  const KdStats *stats = &model->final_stats;
  KdModelResult counts;

  kd_model_count_items (model, &counts);
  CHECK (model, stats->completed == counts.completed,
         "completed %" G_GUINT64_FORMAT ", the model %" G_GUINT64_FORMAT,
         stats->completed, counts.completed);
  /* Without a done callback or dead letter to tell, a job that failed an
   * attempt as the dispatcher was cancelled ended failed or cancelled. */
  if (model->program->no_done && !model->program->dead_letter && model->cancel_started != 0 &&
      model->program->max_attempts > 1)
    CHECK (model, stats->failed + stats->cancelled == counts.failed + counts.cancelled &&
                  stats->failed >= counts.failed,
           "failed %" G_GUINT64_FORMAT " + cancelled %" G_GUINT64_FORMAT ", the model %"
           G_GUINT64_FORMAT " + %" G_GUINT64_FORMAT, stats->failed, stats->cancelled,
           counts.failed, counts.cancelled);
  else
    {
      CHECK (model, stats->failed == counts.failed,
             "failed %" G_GUINT64_FORMAT ", the model %" G_GUINT64_FORMAT, stats->failed,
             counts.failed);
      CHECK (model, stats->cancelled == counts.cancelled,
             "cancelled %" G_GUINT64_FORMAT ", the model %" G_GUINT64_FORMAT,
             stats->cancelled, counts.cancelled);
    }
}

/* Holding the last reference, with every other thread done with the
 * dispatcher: the counters against the model's. */
void
kd_model_check_last_stats (KdModel      *model,
                           KdDispatcher *dispatcher,
                           gboolean      waited)
{
  KdStats stats;
  KdModelResult counts;

  kd_dispatcher_get_stats (dispatcher, &stats);
  kd_model_count_items (model, &counts);
  kd_model_check_stats_invariant (model, &stats, "last holder");

  CHECK (model, stats.submitted == counts.accepted,
         "submitted %" G_GUINT64_FORMAT ", the model accepted %" G_GUINT64_FORMAT,
         stats.submitted, counts.accepted);
  CHECK (model, stats.rejected == counts.refused,
         "rejected %" G_GUINT64_FORMAT ", the model saw %" G_GUINT64_FORMAT " refused",
         stats.rejected, counts.refused);
  if (!waited)
    return;

  /* How the jobs ended, once every done callback told (a main context
   * may still hold some): after the last unref. */
  model->final_stats = stats;
  model->has_final_stats = TRUE;

  CHECK (model, stats.pending == 0, "pending %" G_GUINT64_FORMAT " after wait", stats.pending);
  CHECK (model, stats.running == 0, "running %u after wait", stats.running);
  /* Parked keys are live, with no job left or not. With a main context a
   * done callback may be resuming one as we look: taken out of parking,
   * not yet reaped. */
  if (model->program->context_mode == KD_MODEL_CONTEXT_NONE)
    CHECK (model, stats.live_keys == stats.parked_keys, "live_keys %u, %u parked, after wait",
           stats.live_keys, stats.parked_keys);
  else
    CHECK (model, stats.live_keys <= model->n_keys && stats.parked_keys <= stats.live_keys,
           "live_keys %u, %u parked, after wait", stats.live_keys, stats.parked_keys);
  if (!model->program->park)
    CHECK (model, stats.parked_keys == 0, "%u parked keys without PARK", stats.parked_keys);

  /* Each run after the first was a retry scheduled; a retry scheduled
   * may also have been cancelled before it ran (at most one per item). */
  CHECK (model, stats.retried >= counts.retried,
         "retried %" G_GUINT64_FORMAT ", the model saw %" G_GUINT64_FORMAT " runs again",
         stats.retried, counts.retried);
  if (model->cancel_started == 0)
    CHECK (model, stats.retried == counts.retried,
           "retried %" G_GUINT64_FORMAT ", the model %" G_GUINT64_FORMAT " (no cancel)",
           stats.retried, counts.retried);
  else
    CHECK (model, stats.retried <= counts.retried + counts.accepted,
           "retried %" G_GUINT64_FORMAT ", the model %" G_GUINT64_FORMAT " runs again for %"
           G_GUINT64_FORMAT " items", stats.retried, counts.retried, counts.accepted);
  if (model->program->max_attempts <= 1)
    CHECK (model, stats.retried == 0, "retried %" G_GUINT64_FORMAT " without retry",
           stats.retried);

  /* Idle key states outlive their keys' last jobs; parked keys keep
   * theirs (a done callback may still resume them: fewer, never more).
   * With a main context a done callback may be resuming or dropping a key
   * as we look: out of parking before the snapshot, its state freed
   * within that call, maybe after we read the count. Such a call was in
   * progress all along, so it is in @resolving, read in between. */
  if (model->program->key_states && model->program->key_idle_us > 0)
    {
      guint idle_keys = 0, bound = model->program->max_idle_keys;

      /* No key is made idle once the jobs ended: the bound holds exactly. */
      g_object_get (dispatcher, "idle-keys", &idle_keys, NULL);
      CHECK (model, bound == 0 || idle_keys <= bound,
             "after wait: %u keys idle, for a bound of %u", idle_keys, bound);
    }
  else if (model->program->key_states)
    {
      gint resolving = g_atomic_int_get (&model->resolving);
      gint made = g_atomic_int_get (&model->states_made);
      gint freed = g_atomic_int_get (&model->states_freed);

      CHECK (model, made - freed >= 0 && made - freed <= (gint) stats.parked_keys + resolving,
             "after wait: %d key states made, %d freed, %u keys parked, %d being resolved",
             made, freed, stats.parked_keys, resolving);
    }
}

/* kd_test_count_threads(), but never the process's main thread, whose name
 * is the program's: kd-soak's would count. */
static guint
count_kd_threads (void)
{
  GDir *dir = g_dir_open ("/proc/self/task", 0, NULL);
  char *main_tid = g_strdup_printf ("%d", (int) getpid ());
  const char *tid;
  guint n = 0;

  g_assert_nonnull (dir);
  while ((tid = g_dir_read_name (dir)) != NULL)
    {
      char *path, *comm = NULL;

      if (strcmp (tid, main_tid) == 0)
        continue;
      path = g_build_filename ("/proc/self/task", tid, "comm", NULL);
      if (g_file_get_contents (path, &comm, NULL, NULL) && g_str_has_prefix (comm, "kd-"))
        n++;
      g_free (comm);
      g_free (path);
    }
  g_dir_close (dir);
  g_free (main_tid);

  return n;
}

/* The kdispatch threads left. pthread_join() returns when the kernel has
 * cleared the thread's tid, a moment before it unlists the thread from
 * /proc/self/task, so a joined thread can still be counted (seen under
 * ThreadSanitizer: a worker in state R, gone 0.6 ms later). A thread still
 * listed after the deadline was not joined. */
static guint
count_threads_settled (void)
{
  gint64 deadline = g_get_monotonic_time () + 2 * G_TIME_SPAN_SECOND;
  guint n;

  while ((n = count_kd_threads ()) > 0 && g_get_monotonic_time () < deadline)
    g_thread_yield ();

  return n;
}

/* When a last unref made outside the dispatcher's threads returns. */
void
kd_model_check_after_last_unref (KdModel *model)
{
  const KdModelProgram *program = model->program;
  guint n_threads;
  guint i;

  for (i = 0; i < model->n_items; i++)
    {
      KdModelItem *item = &model->items[i];

      if (g_atomic_int_get (&item->status) != ITEM_ACCEPTED)
        continue;
      CHECK (model, g_atomic_int_get (&item->free_calls) == 1,
             "item %u: freed %d times when the last unref returned", item->id,
             g_atomic_int_get (&item->free_calls));
      if (!program->no_done)
        CHECK (model, g_atomic_int_get (&item->done_calls) == 1,
               "item %u: %d done callbacks when the last unref returned", item->id,
               g_atomic_int_get (&item->done_calls));
    }
  if (model->has_final_stats)
    check_endings (model);

  CHECK (model, g_atomic_int_get (&model->handler_data_freed) == 1,
         "user_data_free ran %d times", g_atomic_int_get (&model->handler_data_freed));
  CHECK (model, g_atomic_int_get (&model->done_data_freed) == (program->no_done ? 0 : 1),
         "the done destroy notify ran %d times", g_atomic_int_get (&model->done_data_freed));
  CHECK (model, g_atomic_int_get (&model->state_data_freed) == (program->key_states ? 1 : 0),
         "the key-state user_data_free ran %d times", g_atomic_int_get (&model->state_data_freed));
  CHECK (model, g_atomic_int_get (&model->states_made) == g_atomic_int_get (&model->states_freed),
         "%d key states made, %d freed", g_atomic_int_get (&model->states_made),
         g_atomic_int_get (&model->states_freed));
  CHECK (model, g_atomic_int_get (&model->dead_letter_data_freed) == (program->dead_letter ? 1 : 0),
         "the dead-letter destroy notify ran %d times",
         g_atomic_int_get (&model->dead_letter_data_freed));
  CHECK (model, g_atomic_int_get (&model->worker_data_freed) == (program->worker_funcs ? 1 : 0),
         "the worker funcs' user_data_free ran %d times",
         g_atomic_int_get (&model->worker_data_freed));
  for (i = 0; i < G_N_ELEMENTS (model->worker_inits); i++)
    {
      gint inits = g_atomic_int_get (&model->worker_inits[i]);
      gint finalizes = g_atomic_int_get (&model->worker_finalizes[i]);

      CHECK (model, inits == finalizes, "worker %u: %d inits, %d finalizes", i, inits, finalizes);
      /* Resizes and idle exits start an index again. */
      if (program->worker_funcs && program->start && !program->pre_cancelled &&
          i < program->n_workers)
        CHECK (model, inits >= 1, "worker %u: %d inits after start", i, inits);
    }
  n_threads = count_threads_settled ();
  CHECK (model, n_threads == 0, "%u kdispatch threads left after the last unref", n_threads);
  g_atomic_int_set (&model->last_unref_checked, 1);
}

/* Known library bug, not fixed yet (found by seed 329 under
 * ThreadSanitizer; deterministic reproduction: hold the cancellable's
 * ::cancelled emission in an earlier handler, then submit): once
 * g_cancellable_cancel() marked the cancellable, another thread's cancel
 * returns at once, yet until the first call's ::cancelled emission reaches
 * the dispatcher's handler, submits are still accepted (the job then ends
 * cancelled without running) or refused FULL or TIMEOUT instead of CLOSED.
 * A submit meets it only while some cancel call is still in progress: one
 * that began before the submit returned and returned after it began. */
/* A submit that began after a close or a cancel returned must be refused
 * with CLOSED; @what says what it got instead. (A cancel counts from the
 * moment g_cancellable_cancel() returned, even while another thread's call
 * is still emitting ::cancelled: test-model's seed 329 and its
 * cancel-twice-shared program found the library accepting such submits.) */
static void
check_submit_after_closing (KdModel     *model,
                            KdModelItem *item,
                            const char  *what)
{
  if (model->close_returned != 0 && item->before > model->close_returned)
    kd_model_violation (model, G_STRLOC, "item %u %s, its submit began after close returned",
                        item->id, what);
  else if (model->cancelled_by != 0 && item->before > model->cancelled_by)
    kd_model_violation (model, G_STRLOC, "item %u %s, its submit began after a cancel returned",
                        item->id, what);
}

void
kd_model_check_items (KdModel *model)
{
  const KdModelProgram *program = model->program;
  gint close_started = model->close_started;
  gboolean never_full = model->n_items < program->capacity &&
                        (program->key_capacity == 0 || model->n_items <= program->key_capacity);
  guint i, j;

  for (i = 0; i < model->n_items; i++)
    {
      KdModelItem *item = &model->items[i];

      if (item->status != ITEM_ACCEPTED)
        {
          CHECK (model, item->handler_runs == 0 && item->done_calls == 0 && item->free_calls == 0,
                 "item %u was %s but ran %d, done %d, freed %d", item->id,
                 item->status == ITEM_REFUSED ? "refused" : "never submitted",
                 item->handler_runs, item->done_calls, item->free_calls);
        }
      if (item->status == ITEM_REFUSED && item->refused_code == REFUSED_GROUP_CANCELLED)
        CHECK (model, item->group_fail_fast, "item %u refused by a group not failing fast",
               item->id);
      else if (item->status == ITEM_REFUSED)
        {
          if (item->refused_code == KD_ERROR_CLOSED)
            CHECK (model, close_started != 0 && close_started < item->after,
                   "item %u refused CLOSED, but no close or cancel had started", item->id);
          else
            {
              CHECK (model, !never_full, "item %u refused %s with %u items for capacity %u",
                     item->id, item->refused_code == KD_ERROR_FULL ? "FULL" : "TIMEOUT",
                     model->n_items, program->capacity);
              check_submit_after_closing (model, item, item->refused_code == KD_ERROR_FULL ?
                                                       "refused FULL, not CLOSED," :
                                                       "refused TIMEOUT, not CLOSED,");
            }
        }
      if (item->status != ITEM_ACCEPTED)
        continue;

      check_submit_after_closing (model, item, "accepted");
      CHECK (model, item->free_calls == 1, "item %u freed %d times", item->id, item->free_calls);
      if (!program->no_done)
        CHECK (model, item->done_calls == 1, "item %u: %d done callbacks", item->id,
               item->done_calls);
      if (item->handler_runs == 0)
        CHECK (model, kd_model_may_skip (model, item) ||
                      (item->key < model->n_keys && model->key_parks[item->key] != 0),
               "item %u never ran, and nobody cancelled or dropped its key", item->id);
      if (program->dead_letter)
        CHECK (model, item->dead_letters == (kd_model_item_failed (model, item) ? 1 : 0),
               "item %u: %d dead letters after %d runs (fails %u, max %u attempts)", item->id,
               item->dead_letters, item->handler_runs, item->fail_attempts,
               program->max_attempts);
    }

  /* Dropped keys: an item accepted before a drop began that had not
   * started by then never runs. */
  for (i = 0; i < model->n_items; i++)
    {
      KdModelItem *item = &model->items[i];
      GArray *drops;

      /* A delayed item joins its key at its due time, which the model does
       * not see. */
      if (item->status != ITEM_ACCEPTED || item->key >= model->n_keys ||
          item->how == HOW_AFTER || (drops = model->drop_ticks[item->key]) == NULL)
        continue;
      for (j = 0; j < drops->len; j++)
        {
          gint dropped = g_array_index (drops, gint, j);

          if (item->after < dropped && (item->first_run_tick == 0 || item->first_run_tick > dropped))
            CHECK (model, item->handler_runs == 0,
                   "key %u: item %u ran (tick %d) though the key was dropped (tick %d) with it "
                   "queued", item->key, item->id, item->first_run_tick, dropped);
        }
    }

  /* Per-key order. O(n²) per key; programs are small. */
  for (i = 0; i < model->n_items; i++)
    {
      KdModelItem *x = &model->items[i];

      /* A delayed item takes its place in its key at its due time, which
       * the model does not see: it only checks that it ran no earlier. */
      if (x->status != ITEM_ACCEPTED || x->key >= model->n_keys || x->how == HOW_AFTER)
        continue;
      for (j = 0; j < model->n_items; j++)
        {
          KdModelItem *y = &model->items[j];

          if (y->status != ITEM_ACCEPTED || y->key != x->key || y->how == HOW_AFTER ||
              !(x->after < y->before ||
                (x->batch != 0 && x->batch == y->batch && x->batch_index < y->batch_index)))
            continue;

          /* x was accepted before y's submit was called, or before y in
           * one batch: x ended (its last attempt returned) before y's
           * first started. */
          if (y->handler_runs != 0)
            {
              /* (A fail-fast group's cancel takes its own jobs out of their
               * keys, whatever comes after them.) */
              CHECK (model, x->handler_runs != 0 || model->key_drops[x->key] != 0 ||
                            x->group_fail_fast,
                     "key %u: item %u ran though the earlier item %u was cancelled",
                     x->key, y->id, x->id);
              if (x->handler_runs != 0)
                CHECK (model, x->return_tick < y->first_run_tick,
                       "key %u: item %u started (tick %d) before the earlier item %u ended "
                       "(tick %d, %d runs)", x->key, y->id, y->first_run_tick, x->id,
                       x->return_tick, x->handler_runs);
              /* PARK: the key's next job starts after the failed one's done
               * callback returned (on the worker: with a main context the
               * runner only queues the callback, see park_end()) */
              if (program->park && kd_model_item_failed (model, x) &&
                  program->context_mode == KD_MODEL_CONTEXT_NONE)
                CHECK (model, x->done_returned != 0 && x->done_returned < y->first_run_tick,
                       "key %u: item %u started (tick %d) before the failed item %u's done "
                       "callback returned (tick %d)", x->key, y->id, y->first_run_tick, x->id,
                       x->done_returned);
            }
          if (!program->no_done)
            CHECK (model, x->done_tick < y->done_tick,
                   "key %u: item %u's done callback ran before the earlier item %u's",
                   x->key, y->id, x->id);
        }
    }
}
