/* kd-model-private.h: what kd-model.c and kd-model-ops.c share
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <kdispatch/kdispatch.h>

#include "kd-model.h"
#include "kd-test-util.h"

G_BEGIN_DECLS

#define TOKEN_LIVE 0x6b646d6cu

/* KdModelItem.refused_code of an item its cancelled group refused */
#define REFUSED_GROUP_CANCELLED (-1)
#define TOKEN_DEAD 0xdeadf7eeu

/* Any byte string decodes to a valid program, so the keys and tables are
 * indexed modulo their size. */
extern const char *const kd_model_keys[KD_MODEL_MAX_KEYS];

typedef struct _KdModel KdModel;

typedef enum
{
  ITEM_UNTRIED,   /* its thread stopped (unref) before submitting it */
  ITEM_ACCEPTED,
  ITEM_REFUSED,
} ItemStatus;

typedef enum
{
  HOW_SUBMIT,
  HOW_TRY,
  HOW_TIMEOUT,
  HOW_ASYNC,
  HOW_MANY,
  HOW_TRY_MANY,
  HOW_TIMEOUT_MANY,
  HOW_GROUP,
  HOW_AFTER,     /* kd_dispatcher_submit_at(): joins its key at @due_us */
} SubmitHow;

typedef struct
{
  /* Fixed by the program */
  guint      id;
  guint      key;          /* n_keys: unkeyed */
  gboolean   fail;
  guint      fail_attempts; /* its first attempts fail; G_MAXUINT: all */
  guint      spin;
  gboolean   yield;
  gboolean   deferred;     /* its handler defers it; the returner ends it */

  /* The submitting thread; @after is written last and published with the
   * status (an async submission's when its callback ran: it was accepted,
   * if it was, before that) */
  SubmitHow  how;
  gboolean   group_fail_fast; /* HOW_GROUP: its group fails fast; it may end cancelled */
  gint64     due_us;        /* HOW_AFTER: its due time (monotonic), set before the call */
  gpointer   async_token;   /* HOW_ASYNC: the item given, until the callback */
  guint      batch;         /* the *_MANY ops: its op's index + 1; 0 for others */
  guint      batch_index;   /* its place in the batch */
  gint       before;
  gint       status;
  gint       refused_code;
  gint       after;

  /* The dispatcher's threads (atomic) */
  gint       handler_runs;      /* attempts that started */
  gint       handler_returned;  /* the last attempt returned */
  gint       run_tick;          /* the last attempt started */
  gint       first_run_tick;
  gint       return_tick;       /* the last attempt returned */
  gint       dead_letters;
  gint       ended_failed;      /* seen by its dead letter or done callback */
  gint       failed_cancelled;  /* an attempt failed with the cancel seen */
  gint       done_calls;
  gint       done_tick;
  gint       done_returned;
  gint       free_calls;
  gint       pending_counted;   /* in key_pending, until it ends */
} KdModelItem;

/* What the dispatcher holds as the item. */
typedef struct
{
  guint32      magic;
  KdModel     *model;
  KdModelItem *item;
} Token;

typedef struct
{
  KdModel      *model;
  guint         index;      /* n_threads: the main thread */
  KdDispatcher *dispatcher; /* this thread's reference; NULL once dropped */
  GThread      *thread;
  gint          at_op;      /* progress, for the hang report */
  guint64       accepted;
  guint64       refused;
  GMainContext *context;       /* its async submissions' callbacks come here */
  guint         async_pending; /* async submissions whose callback did not run */
  KdStats       last_stats;
  gboolean      has_stats;
  KdGroup      *group;         /* during a group op: the group it submits through */
} ModelThread;

struct _KdModel
{
  const KdModelProgram *program;
  guint           n_keys;
  guint           n_items;      /* the program's, and the prologue's */
  KdModelItem     items[KD_MODEL_MAX_ITEMS + 1];
  ModelThread     threads[KD_MODEL_MAX_THREADS + 1];

  GMainContext   *context;
  GThread        *loop_thread;
  KdTestGate      loop_running;
  gint            loop_stop;
  GCancellable   *cancellable;   /* the program's own, if it sets one */

  gint            clock;

  /* Reference holders: the program's threads and the main thread */
  gint            refs;
  KdTestCounter   unrefs_done;
  KdTestGate      start;
  KdTestCounter   finished;

  /* Ticks of the first close or cancel: when a call started, when one
   * returned (0: none yet) */
  gint            close_started;
  gint            cancel_started;
  KdStats         final_stats;      /* the last holder's, after wait() */
  gboolean        has_final_stats;
  gint            closed_by;
  gint            cancelled_by;
  gint            close_returned;   /* the first kd_dispatcher_close() only */

  gboolean        strict;          /* known library bugs are violations */

  gint            key_running[KD_MODEL_MAX_KEYS];
  gint            key_live_states[KD_MODEL_MAX_KEYS];
  gint            states_made;
  gint            states_freed;

  gint            handler_data_freed;
  gint            done_data_freed;
  gint            state_data_freed;
  gint            last_unref_checked;
  gint            last_unref_started;

  /* Held by whoever iterates the ITERATE-mode context (see
   * kd_model_iterate_context()) */
  GMutex          iterate_lock;

  KdDispatcher   *dispatcher;      /* for done callbacks and the janitor */

  /* Retry and PARK (see resolve_key() in kd-model.c). key_parked is the
   * model's view: set by the done callback of a failed item (the key
   * parked before it), cleared by whoever wins it to resume or drop. */
  gint            retries;         /* failed attempts with one to come (@lock) */
  gint64          first_retry_us;  /* monotonic time of the first (@lock) */
  gint            key_parked[KD_MODEL_MAX_KEYS];
  gint            key_parks[KD_MODEL_MAX_KEYS];
  gint            key_drops[KD_MODEL_MAX_KEYS];
  GArray         *drop_ticks[KD_MODEL_MAX_KEYS];  /* under @lock */
  gint            n_parks;
  gint            n_drops;
  gint            resolving;       /* resume_key/drop_key calls of the model in progress */
  gint            dead_letter_data_freed;

  /* Key capacity: accepted (counted when the submit returned) and not
   * ended, and submits in progress, per key */
  gint            key_pending[KD_MODEL_MAX_KEYS];
  gint            key_submitting[KD_MODEL_MAX_KEYS];
  /* Fail-fast group ops under way: their cancelled items may free their
   * keys' room before the model uncounts them (atomic) */
  gint            fail_fast_groups;

  /* Worker funcs */
  gint            max_workers;       /* atomic: the most n-workers set so far */
  gint            worker_inits[8];
  gint            worker_finalizes[8];
  gint            worker_data_freed;

  /* A model thread that resolves parked keys and cancels huge retries, so
   * that waits end; stopped before the last unref (see janitor_main() in
   * kd-model.c). It waits in @janitor_context: @context in ITERATE mode,
   * else one of its own. @janitor_wake is made ready by whoever has news
   * for it, @janitor_deadline (set by the janitor only) at its next
   * deadline; both live until the end of the run. */
  /* The returner: ends the jobs whose handlers deferred them, as their
   * handlers would have, from a thread of its own (returner_main() in
   * kd-model.c); it runs until the last unref returned. */
  GThread        *returner;
  GAsyncQueue    *returns;

  GThread        *janitor;
  GMainContext   *janitor_context;
  GSource        *janitor_wake;
  GSource        *janitor_deadline;
  gint            janitor_stop;      /* atomic */
  /* ITERATE mode: iterate ops waiting for @iterate_lock while the janitor
   * may hold it (atomic; falls to 0 under @lock, with @iterate_turn
   * broadcast) */
  gint            iterate_wanted;
  GCond           iterate_turn;

  GMutex          lock;
  gint            n_violations;
  GString        *report;
  gint            n_known;
  GString        *known;
};

void kd_model_violation (KdModel    *model,
                         const char *where,
                         const char *format,
                         ...) G_GNUC_PRINTF (3, 4);

/* A hit of a known library bug: recorded apart, or a violation in strict
 * mode. For a bug the model finds that cannot be fixed at once: its check
 * calls this instead of CHECK until the library is fixed. None is listed
 * at the moment. */
void kd_model_known_bug (KdModel    *model,
                         const char *where,
                         const char *format,
                         ...) G_GNUC_PRINTF (3, 4);

#define CHECK(model, cond, ...) \
  G_STMT_START { \
    if (G_UNLIKELY (!(cond))) \
      kd_model_violation ((model), G_STRLOC, __VA_ARGS__); \
  } G_STMT_END

static inline gint
kd_model_tick (KdModel *model)
{
  return g_atomic_int_add (&model->clock, 1) + 1;
}

/* Lowers *@where to @tick unless it is already set lower (0: unset). */
static inline void
kd_model_tick_min (gint *where,
                   gint  tick)
{
  gint old;

  do
    {
      old = g_atomic_int_get (where);
      if (old != 0 && old <= tick)
        return;
    }
  while (!g_atomic_int_compare_and_exchange (where, old, tick));
}

/* kd-model.c */
void     kd_model_drop_ref               (ModelThread   *thread,
                                          gboolean       wait_first);
/* Resumes (or drops) key @key if the model saw it park and nobody else
 * resolved it since; FALSE if there was nothing to do. */
gboolean kd_model_resolve_key            (KdModel       *model,
                                          KdDispatcher  *dispatcher,
                                          guint          key,
                                          gboolean       drop);
/* Iterates the ITERATE-mode context once, without blocking, taking its turn
 * from the janitor if it waits there. */
void     kd_model_iterate_context        (KdModel       *model);
/* Records the cancel of the dispatcher's cancellable. */
void     kd_model_cancel                 (KdModel       *model,
                                          KdDispatcher  *dispatcher);
/* Whether @item ended failed: its last attempt failed and was its last
 * allowed one, or (once the dispatcher is cancelled no job is retried) its
 * dead letter or done callback saw it fail. */
gboolean kd_model_item_failed            (KdModel       *model,
                                          KdModelItem   *item);
/* Whether a handler run of @item may be missing: a cancel started, or its
 * key was dropped. */
gboolean kd_model_may_skip               (KdModel       *model,
                                          KdModelItem   *item);
/* Whether the model's count of the keys' pending items is exact, for the
 * checks of the key capacity around @item. */
gboolean kd_model_key_count_exact        (KdModel       *model,
                                          KdModelItem   *item);
/* @item ended: it no longer counts against its key's capacity. */
void     kd_model_item_uncount           (KdModel       *model,
                                          KdModelItem   *item);

/* kd-model-checks.c */
/* Fills the counts of @result (not its violations) from the items. */
void     kd_model_count_items            (KdModel       *model,
                                          KdModelResult *counts);
void     kd_model_check_stats_invariant  (KdModel       *model,
                                          const KdStats *stats,
                                          const char    *where);
void     kd_model_check_last_stats       (KdModel       *model,
                                          KdDispatcher  *dispatcher,
                                          gboolean       waited);
void     kd_model_check_after_last_unref (KdModel       *model);
void     kd_model_check_items            (KdModel       *model);

/* kd-model-ops.c: runs @op on @thread; FALSE when the thread is done with
 * the dispatcher (it dropped its reference). */
gboolean kd_model_run_op                 (ModelThread     *thread,
                                          const KdModelOp *op);
/* Submits item @item (already set up) from @thread. */
void     kd_model_submit_one             (ModelThread     *thread,
                                          guint            item);
/* Iterates @thread's context until each of its async submissions called
 * back. */
void     kd_model_drain_async            (ModelThread     *thread);
gboolean kd_model_op_is_batch            (const KdModelOp *op);

G_END_DECLS
