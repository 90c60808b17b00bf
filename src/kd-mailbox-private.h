/* kd-mailbox-private.h: a key's queue of jobs
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-job-private.h"
#include "kd-task-private.h"

G_BEGIN_DECLS

typedef struct _KdMailbox KdMailbox;

KdMailbox  *kd_mailbox_new       (const char *key);
KdMailbox  *kd_mailbox_ref       (KdMailbox  *self);
void        kd_mailbox_unref     (KdMailbox  *self);
KdTask     *kd_mailbox_get_task  (KdMailbox  *self);
KdMailbox  *kd_mailbox_from_task (KdTask     *task);
const char *kd_mailbox_get_key   (KdMailbox  *self);
void        kd_mailbox_push      (KdMailbox  *self,
                                  KdJob      *job);
guint       kd_mailbox_pop_batch (KdMailbox  *self,
                                  KdJob     **jobs,
                                  guint       max_jobs);
gboolean    kd_mailbox_is_empty  (KdMailbox  *self);

G_END_DECLS
