/* kd-job-private.h: the job record
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include "kd-dispatcher.h"
#include "kd-item-private.h"
#include "kd-job.h"
#include "kd-label-private.h"
#include "kd-task-private.h"

G_BEGIN_DECLS

typedef struct _KdMailbox      KdMailbox;
typedef struct _KdSubmitResult KdSubmitResult;

struct _KdJob
{
  KdTask        task;        /* first: an unkeyed job is a scheduler task */
  KdDispatcher *dispatcher;
  KdMailbox    *mailbox;     /* NULL for an unkeyed job */
  char         *label;       /* a pipeline stage's job: its key (kd_label_new()),
                              * which a parallel or ordered stage's unkeyed job
                              * carries and a keyed stage's job passes on */
  gpointer      ticket;      /* a pipeline's ordered stage: until the job starts,
                              * its key's queue in the reorder (a KdOrderKey);
                              * then the ticket of the item it runs */
  KdSubmitResult *result;    /* kd_dispatcher_submit_async()'s, until the job ended */
  gpointer      outbox;      /* a pipeline stage's job: what it emitted off its
                              * worker, for a worker to pass on (kd-pipeline.c) */
  struct _KdGroupState *group; /* the state of the group it was submitted
                              * through, or NULL; a reference of its own from
                              * just before it is queued until its done
                              * callback ran */
  gpointer      item;
  GError       *error;       /* how it ended, kept until a main context delivers it */
  guint         epoch;       /* the admission epoch it joined */
  guint         attempt;     /* runs so far, this one included */
  KdItemKind    item_kind;   /* who frees the item once the job ended */
  gboolean      dropped;     /* its parked key was dropped: end it cancelled */
  gint          defer;       /* atomic: KD_DEFER_* (kd-dispatcher-defer.c) */
};

/* A deferred job's progress: its handler deferred it (or its worker handed
 * it to the handler context, whose handler may defer it in turn), its
 * worker is done with it, it was returned, and, for a job on the handler
 * context, the handler there returned. Whoever sets the last of those
 * (two, or three on the context) ends it. */
enum
{
  KD_DEFER_ASKED = 1 << 0,
  KD_DEFER_HANDLER_DONE = 1 << 1,
  KD_DEFER_RETURNED = 1 << 2,
  KD_DEFER_ON_CONTEXT = 1 << 3,   /* handed to the handler context */
  KD_DEFER_BY_HANDLER = 1 << 4,   /* and its handler there deferred it */
  KD_DEFER_RUNNING = 1 << 5,      /* its handler runs: kd_job_defer() may be called */
  KD_DEFER_CONTEXT_DONE = 1 << 6, /* its handler in the handler context returned */
};

/* A job is its task: queues link jobs through their task header. */
G_STATIC_ASSERT (G_STRUCT_OFFSET (KdJob, task) == 0);

KdJob *kd_job_new  (KdDispatcher *dispatcher,
                    gpointer      item,
                    guint         epoch);
void   kd_job_free (KdJob        *job);

G_END_DECLS
