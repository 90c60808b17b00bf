/* kd-job-private.h: the job record
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-dispatcher.h"
#include "kd-job.h"
#include "kd-task-private.h"

G_BEGIN_DECLS

typedef struct _KdMailbox KdMailbox;

struct _KdJob
{
  KdTask        task;        /* first: an unkeyed job is a scheduler task */
  KdDispatcher *dispatcher;
  KdMailbox    *mailbox;     /* NULL for an unkeyed job */
  gpointer      item;
  GError       *error;       /* how it ended, kept until a main context delivers it */
  guint         epoch;       /* the admission epoch it joined */
};

/* A job is its task: queues link jobs through their task header. */
G_STATIC_ASSERT (G_STRUCT_OFFSET (KdJob, task) == 0);

KdJob *kd_job_new  (KdDispatcher *dispatcher,
                    gpointer      item,
                    guint         epoch);
void   kd_job_free (KdJob        *job);

G_END_DECLS
