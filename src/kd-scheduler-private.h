/* kd-scheduler-private.h: the bounded set of worker threads and the 2-tier fan-out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-task-private.h"
#include "kd-timer-private.h"

G_BEGIN_DECLS

typedef struct _KdScheduler KdScheduler;
typedef struct _KdWorker    KdWorker;

/* Runs one task on @worker's thread. */
typedef void (*KdTaskFunc) (KdTask   *task,
                            KdWorker *worker,
                            gpointer  user_data);

/* On a worker's thread: the task that runs a value taken from the ring of
 * values (kd_scheduler_push_value()), with its tag. */
typedef KdTask  *(*KdValueTaskFunc)   (gpointer   value,
                                       guint32    tag,
                                       KdWorker  *worker,
                                       gpointer   user_data);

/* On a worker's thread, before its first task: FALSE with @error set if
 * the worker cannot run. */
typedef gboolean (*KdWorkerStartFunc) (KdWorker  *worker,
                                       gpointer   user_data,
                                       GError   **error);
/* On a worker's thread, as it exits. */
typedef void     (*KdWorkerStopFunc)  (KdWorker  *worker,
                                       gpointer   user_data);

KdScheduler *kd_scheduler_new        (guint              n_workers,
                                      guint              n_groups,
                                      gboolean           with_timer,
                                      KdTaskFunc         func,
                                      KdValueTaskFunc    value_task,
                                      guint              n_values,
                                      KdWorkerStartFunc  start,
                                      KdWorkerStopFunc   stop,
                                      gpointer           user_data,
                                      GError           **error);
void         kd_scheduler_push       (KdScheduler *self,
                                      KdTask      *task);
gboolean     kd_scheduler_push_value (KdScheduler *self,
                                      gpointer     value,
                                      guint32      tag);
guint        kd_scheduler_push_values (KdScheduler    *self,
                                       gpointer const *values,
                                       guint           n_values,
                                       guint32         tag);
void         kd_scheduler_push_chain (KdScheduler *self,
                                      KdTask      *newest,
                                      KdTask      *oldest);
void         kd_scheduler_push_at    (KdScheduler *self,
                                      KdTask      *task,
                                      gint64       due_time);
gboolean     kd_scheduler_ensure_timer (KdScheduler *self,
                                        GError     **error);
gboolean     kd_scheduler_call_at    (KdScheduler *self,
                                      gint64       due_time,
                                      KdTimerFunc  func,
                                      gpointer     owner,
                                      gpointer     data);
void         kd_scheduler_hurry      (KdScheduler *self);
void         kd_scheduler_sleep_until (KdScheduler *self,
                                       gint64       due_time);
gboolean     kd_scheduler_resize     (KdScheduler  *self,
                                      guint         n_workers,
                                      GError      **error);
void         kd_scheduler_set_idle_exit (KdScheduler *self,
                                         gint64       idle_us,
                                         guint        min_ready);
guint        kd_scheduler_get_n_workers (KdScheduler *self);
guint        kd_scheduler_get_n_threads (KdScheduler *self);
void         kd_scheduler_shutdown   (KdScheduler *self);
void         kd_scheduler_join       (KdScheduler *self);
gboolean     kd_scheduler_runs_here  (KdScheduler *self);
void         kd_scheduler_free       (KdScheduler *self);

KdWorker    *kd_worker_get_current   (void);
KdScheduler *kd_worker_get_scheduler (KdWorker    *worker);
guint        kd_worker_get_index     (KdWorker    *worker);
gpointer     kd_worker_get_data      (KdWorker    *worker);
void         kd_worker_set_data      (KdWorker    *worker,
                                      gpointer     data);

G_END_DECLS
