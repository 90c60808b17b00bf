/* kd-dispatcher-stage-private.h: what a pipeline reaches of a dispatcher it uses as a stage
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Held by kd-dispatcher-stage.c, but for the waits and the thread test,
 * which are the core's (kd-dispatcher.c).
 */

#pragma once

#include "kd-admission-private.h"
#include "kd-dispatcher.h"
#include "kd-item-private.h"

G_BEGIN_DECLS

/* What a pipeline adds to a dispatcher it uses as a stage. */
typedef struct
{
  /* kd_job_emit(): from the job's handler on its worker, or (@away) from
   * anywhere else, or from the handler once it deferred the job, while
   * the job is deferred or runs in a handler context: that must not
   * block */
  gboolean (*emit)    (KdJob       *job,
                       const char  *key,
                       gpointer     item,
                       KdItemKind   kind,
                       gboolean     away,
                       GError     **error,
                       gpointer     user_data);
  /* a job of the stage is deferred (kd_job_defer(), or a handler context),
   * on the thread that defers it, before it can emit away */
  void     (*deferring) (KdJob     *job,
                         gpointer   user_data);
  /* a deferred job was returned: on a worker, before its outcome is
   * judged (a retry runs after), it passes on what it emitted away */
  void     (*returned) (KdJob      *job,
                        gpointer    user_data);

  /* a job queued with a ticket (an ordered stage's), on the worker about
   * to start it, before anything else: it may take another item and
   * ticket (and with them their unit's epoch) */
  void     (*claim)   (KdJob       *job,
                       gpointer     user_data);
  /* every job of the stage once it ended, ran or not, on the worker that
   * ended it, before its done callback and before its unit is released */
  void     (*ended)   (KdJob       *job,
                       gpointer     user_data);
  /* once: the stage is closed and nothing is pending */
  void     (*drained) (gpointer     user_data);
} KdStageHooks;

void     kd_dispatcher_set_stage_hooks  (KdDispatcher       *self,
                                         const KdStageHooks *hooks,
                                         gpointer            user_data);
gboolean kd_dispatcher_admit            (KdDispatcher       *self,
                                         guint              *epoch,
                                         GError            **error);
void     kd_dispatcher_push_admitted    (KdDispatcher       *self,
                                         gboolean            keyed,
                                         char               *label,
                                         gpointer            item,
                                         KdItemKind          kind,
                                         gpointer            ticket,
                                         guint               epoch);
void     kd_dispatcher_unadmit          (KdDispatcher       *self,
                                         guint               epoch);
void     kd_dispatcher_free_item        (KdDispatcher       *self,
                                         gpointer            item,
                                         KdItemKind          kind);
void     kd_dispatcher_hand_back        (KdDispatcher       *self,
                                         const char         *key,
                                         gpointer            item,
                                         KdItemKind          kind,
                                         const GError       *error);
gboolean kd_dispatcher_emit_job         (KdJob              *job,
                                         const char         *key,
                                         gpointer            item,
                                         KdItemKind          kind,
                                         GError            **error);
gpointer kd_dispatcher_get_worker_data  (KdDispatcher       *self);
/* kd-dispatcher.c */
gboolean kd_dispatcher_runs_here        (KdDispatcher       *self);
GMainContext *kd_dispatcher_dispatching_here (KdDispatcher  *self);
void     kd_dispatcher_wait_sealed      (KdDispatcher       *self,
                                         KdSealedFunc        sealed,
                                         gpointer            user_data);

G_END_DECLS
