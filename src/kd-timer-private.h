/* kd-timer-private.h: tasks that wait for their time, on one thread
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

typedef struct _KdTimer KdTimer;

/* On the timer's thread: the time of a call added with kd_timer_add() has
 * come. */
typedef void (*KdTimerFunc) (gpointer owner,
                             gpointer data);

KdTimer *kd_timer_new    (const char  *thread_name,
                          GError     **error);
gboolean kd_timer_add    (KdTimer     *self,
                          gint64       due_time,
                          KdTimerFunc  func,
                          gpointer     owner,
                          gpointer     data);
void     kd_timer_hurry  (KdTimer     *self);
void     kd_timer_stop   (KdTimer     *self);
gboolean kd_timer_runs_here (KdTimer  *self);
guint    kd_timer_get_allocated (KdTimer *self);
void     kd_timer_join   (KdTimer     *self);
void     kd_timer_free   (KdTimer     *self);

G_END_DECLS
