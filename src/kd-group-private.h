/* kd-group-private.h: where a group and its dispatcher meet
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A group's job is a dispatcher's job with @group set (kd-job-private.h)
 * to the group's KdGroupState: what its jobs share with it (counters,
 * barrier, first error, cancellable), which the jobs keep alive rather
 * than the KdGroup, so that the group, and the reference it holds to its
 * dispatcher, go where the application drops them. The group submits
 * through the dispatcher's own paths (the first half below, in
 * kd-dispatcher.c and kd-dispatcher-async.c); the dispatcher tells the
 * state about each of its jobs (the second half, kd-group.c): entered once
 * it is about to be queued, then exactly one of unqueued (its key gave up
 * waiting for room: it never existed) or ended.
 */

#pragma once

#include "kd-admission-private.h"
#include "kd-group.h"
#include "kd-item-private.h"
#include "kd-submit-result-private.h"

G_BEGIN_DECLS

/* The source tags of a group's async calls' results. */
#define KD_GROUP_SUBMIT_TAG ((gpointer) (guintptr) kd_group_submit_async)
#define KD_GROUP_WAIT_TAG   ((gpointer) (guintptr) kd_group_wait_async)

typedef struct _KdGroupState KdGroupState;

/* What ended a job, for the group's counters. */
typedef enum
{
  KD_GROUP_COMPLETED,
  KD_GROUP_FAILED,
  KD_GROUP_CANCELLED,
} KdGroupEnd;

/* kd-dispatcher.c and kd-dispatcher-async.c */
gboolean kd_dispatcher_submit_in_group       (KdDispatcher        *dispatcher,
                                              KdGroupState        *group,
                                              const char          *key,
                                              gpointer             item,
                                              KdItemKind           item_kind,
                                              KdAdmitMode          mode,
                                              gint64               deadline,
                                              GError             **error);
void     kd_dispatcher_submit_async_in_group (KdDispatcher        *dispatcher,
                                              KdGroup             *group,
                                              const char          *key,
                                              gpointer             item,
                                              KdItemKind           item_kind,
                                              GCancellable        *cancellable,
                                              GAsyncReadyCallback  callback,
                                              gpointer             user_data);
KdSubmitResult *kd_dispatcher_new_group_result (KdDispatcher        *dispatcher,
                                                KdGroup             *group,
                                                gpointer             source_tag,
                                                gpointer             item,
                                                GCancellable        *cancellable,
                                                GAsyncReadyCallback  callback,
                                                gpointer             user_data);

/* kd-group.c */
KdGroupState *kd_group_get_state            (KdGroup      *group);
void          kd_group_state_unref          (KdGroupState *self);
GCancellable *kd_group_state_get_cancellable (KdGroupState *self);
gboolean kd_group_state_check_open     (KdGroupState  *self,
                                        GError       **error);
void     kd_group_state_count_rejected (KdGroupState  *self);
void     kd_group_state_enter          (KdGroupState  *self);
void     kd_group_state_unqueued       (KdGroupState  *self);
gboolean kd_group_state_is_cancelled   (KdGroupState  *self);
guint    kd_group_state_get_band       (KdGroupState  *self);
void     kd_group_state_note_error     (KdGroupState  *self,
                                        const GError  *error);
void     kd_group_state_job_ended      (KdGroupState  *self,
                                        KdGroupEnd     end);

G_END_DECLS
