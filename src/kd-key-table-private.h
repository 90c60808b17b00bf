/* kd-key-table-private.h: the sharded table of keys with work
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-job-private.h"
#include "kd-mailbox-private.h"

G_BEGIN_DECLS

typedef struct _KdKeyTable KdKeyTable;

KdKeyTable *kd_key_table_new   (void);
void        kd_key_table_free  (KdKeyTable  *self);
KdMailbox  *kd_key_table_push  (KdKeyTable  *self,
                                const char  *key,
                                KdJob       *job);
guint       kd_key_table_pop   (KdKeyTable  *self,
                                KdMailbox   *mailbox,
                                KdJob      **jobs,
                                guint        max_jobs);
guint       kd_key_table_next  (KdKeyTable  *self,
                                KdMailbox   *mailbox,
                                KdJob      **jobs,
                                guint        max_jobs,
                                gboolean    *reaped);
void        kd_key_table_put_back (KdKeyTable  *self,
                                   KdMailbox   *mailbox,
                                   KdJob      **jobs,
                                   guint        n);
gboolean    kd_key_table_unpark   (KdKeyTable  *self,
                                   KdMailbox   *mailbox,
                                   gboolean     drop);
gboolean    kd_key_table_is_empty (KdKeyTable *self,
                                   KdMailbox  *mailbox);
guint       kd_key_table_count (KdKeyTable  *self);

G_END_DECLS
