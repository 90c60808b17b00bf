/* kd-timer-private.h: tasks that wait for their time, on one thread
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-task-private.h"

G_BEGIN_DECLS

typedef struct _KdTimer KdTimer;

/* On the timer's thread: @task's time has come. */
typedef void (*KdTimerFunc) (KdTask   *task,
                             gpointer  user_data);

KdTimer *kd_timer_new    (const char  *thread_name,
                          KdTimerFunc  func,
                          gpointer     user_data);
void     kd_timer_add    (KdTimer     *self,
                          KdTask      *task,
                          gint64       due_time);
void     kd_timer_hurry  (KdTimer     *self);
void     kd_timer_stop   (KdTimer     *self);
void     kd_timer_free   (KdTimer     *self);

G_END_DECLS
