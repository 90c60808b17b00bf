/* kd-key-table-private.h: the sharded table of keys and their mailboxes
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-admission-private.h"
#include "kd-job-private.h"
#include "kd-mailbox-private.h"

G_BEGIN_DECLS

typedef struct _KdKeyTable KdKeyTable;

/* A bound on each key's pending jobs, and how a push waits for room. */
typedef struct
{
  guint        capacity;
  KdAdmitMode  mode;
  gint64       deadline;    /* KD_ADMIT_DEADLINE: g_get_monotonic_time() */
  KdAdmission *admission;   /* a push stops waiting once it is closed */
} KdKeyBound;

KdKeyTable *kd_key_table_new   (void);
void        kd_key_table_free  (KdKeyTable  *self);
KdMailbox  *kd_key_table_push  (KdKeyTable  *self,
                                const char  *key,
                                KdJob       *job,
                                gboolean     count);
gboolean    kd_key_table_push_bounded (KdKeyTable        *self,
                                       const char        *key,
                                       KdJob             *job,
                                       const KdKeyBound  *bound,
                                       guint64           *submitted,
                                       KdMailbox        **activated,
                                       GError           **error);
void        kd_key_table_job_ended    (KdKeyTable        *self,
                                       KdMailbox         *mailbox);
void        kd_key_table_wake_bounded (KdKeyTable        *self);
guint       kd_key_table_count_jobs   (KdKeyTable        *self,
                                       const char        *key);
void        kd_key_table_wait_blocked (KdKeyTable        *self,
                                       const char        *key,
                                       guint              n);
guint       kd_key_table_pop   (KdKeyTable  *self,
                                KdMailbox   *mailbox,
                                KdJob      **jobs,
                                guint        max_jobs);
guint       kd_key_table_next  (KdKeyTable  *self,
                                KdMailbox   *mailbox,
                                KdJob      **jobs,
                                guint        max_jobs,
                                gboolean     keep_state,
                                gboolean    *reaped,
                                KdMailbox  **evicted,
                                gpointer    *evicted_state);
void        kd_key_table_set_max_idle (KdKeyTable *self,
                                       guint       max_idle);
guint       kd_key_table_take_expired (KdKeyTable *self,
                                       gint64      reaped_before,
                                       KdMailbox **mailboxes,
                                       gpointer   *states,
                                       guint       max);
gint64      kd_key_table_oldest_idle  (KdKeyTable *self);
void        kd_key_table_expire_end   (KdKeyTable *self,
                                       KdMailbox  *mailbox);
guint       kd_key_table_count_idle   (KdKeyTable *self);
void        kd_key_table_put_back (KdKeyTable  *self,
                                   KdMailbox   *mailbox,
                                   KdJob      **jobs,
                                   guint        n);
void        kd_key_table_drop_queued (KdKeyTable *self,
                                      KdMailbox  *mailbox);
gboolean    kd_key_table_unpark   (KdKeyTable  *self,
                                   KdMailbox   *mailbox,
                                   gboolean     drop);
gboolean    kd_key_table_is_empty (KdKeyTable *self,
                                   KdMailbox  *mailbox);
guint       kd_key_table_count (KdKeyTable  *self);

G_END_DECLS
