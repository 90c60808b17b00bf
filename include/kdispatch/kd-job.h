/* kd-job.h: what a handler and a done callback see of a job
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#if !defined(KD_INSIDE) && !defined(KDISPATCH_COMPILATION)
# error "Only <kdispatch/kdispatch.h> can be included directly."
#endif

#include <gio/gio.h>

#include "kd-version.h"

G_BEGIN_DECLS

typedef struct _KdJob KdJob;

KD_AVAILABLE_IN_ALL
const char   *kd_job_get_key         (KdJob *job);
KD_AVAILABLE_IN_ALL
gpointer      kd_job_get_item        (KdJob *job);
KD_AVAILABLE_IN_ALL
const GValue *kd_job_get_value       (KdJob *job);
KD_AVAILABLE_IN_ALL
GCancellable *kd_job_get_cancellable (KdJob *job);
KD_AVAILABLE_IN_ALL
GCancellable *kd_job_get_group_cancellable (KdJob *job);
KD_AVAILABLE_IN_ALL
gpointer      kd_job_get_key_state   (KdJob *job);
KD_AVAILABLE_IN_ALL
gpointer      kd_job_get_worker_data (KdJob *job);
KD_AVAILABLE_IN_ALL
guint         kd_job_get_attempt     (KdJob *job);
KD_AVAILABLE_IN_ALL
void          kd_job_defer           (KdJob       *job);
KD_AVAILABLE_IN_ALL
void          kd_job_return_success  (KdJob       *job);
KD_AVAILABLE_IN_ALL
void          kd_job_return_error    (KdJob       *job,
                                      GError      *error);
KD_AVAILABLE_IN_ALL
void          kd_job_return_error_literal (KdJob      *job,
                                           GQuark      domain,
                                           gint        code,
                                           const char *message);
KD_AVAILABLE_IN_ALL
gboolean      kd_job_emit            (KdJob       *job,
                                      const char  *key,
                                      gpointer     item,
                                      GError     **error);

KD_AVAILABLE_IN_ALL
gboolean      kd_job_emit_value      (KdJob        *job,
                                      const char   *key,
                                      const GValue *value,
                                      GError      **error);

G_END_DECLS
