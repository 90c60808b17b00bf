/* kd-parked-keys-private.h: the keys a dispatcher parked after a failure
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-key-map-private.h"
#include "kd-key-table-private.h"
#include "kd-mailbox-private.h"

G_BEGIN_DECLS

typedef struct
{
  GMutex   lock;
  KdKeyMap map;      /* the key (its mailbox's) → KdMailbox, under @lock */
  gboolean closed;   /* no key parks any more; under @lock */
  gint     count;    /* atomic copy of the map's size */
} KdParkedKeys;

void       kd_parked_keys_init   (KdParkedKeys *self);
void       kd_parked_keys_clear  (KdParkedKeys *self);
gboolean   kd_parked_keys_add    (KdParkedKeys *self,
                                  KdMailbox    *mailbox);
guint      kd_parked_keys_settle (KdParkedKeys *self,
                                  KdMailbox    *mailbox);
gboolean   kd_parked_keys_take   (KdParkedKeys *self,
                                  KdKeyTable   *keys,
                                  const char   *key,
                                  gboolean      drop,
                                  KdMailbox   **to_unpark);
GPtrArray *kd_parked_keys_close  (KdParkedKeys *self);
char     **kd_parked_keys_list   (KdParkedKeys *self);
guint      kd_parked_keys_count  (KdParkedKeys *self);

G_END_DECLS
