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
} SubmitHow;

typedef struct
{
  /* Fixed by the program */
  guint      id;
  guint      key;          /* n_keys: unkeyed */
  gboolean   fail;
  guint      spin;
  gboolean   yield;

  /* The submitting thread; @after is written last and published with the
   * status */
  SubmitHow  how;
  gint       before;
  gint       status;
  gint       refused_code;
  gint       after;

  /* The dispatcher's threads (atomic) */
  gint       handler_runs;
  gint       handler_returned;
  gint       run_tick;
  gint       done_calls;
  gint       done_tick;
  gint       free_calls;
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
  KdStats       last_stats;
  gboolean      has_stats;
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

  GMutex          iterate_lock;

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

G_END_DECLS
