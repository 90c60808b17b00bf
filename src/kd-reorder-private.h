/* kd-reorder-private.h: what a pipeline's ordered stage emits, released in entry order
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

#include "kd-item-private.h"

G_BEGIN_DECLS

typedef struct _KdReorder KdReorder;
typedef struct _KdTicket  KdTicket;
typedef struct _KdOrderKey KdOrderKey;

/* Passes @item (transfer full on TRUE) on downstream; may block. On FALSE
 * the item is still the caller's. @key is borrowed. */
typedef gboolean (*KdReorderPassFunc) (const char  *key,
                                       gpointer     item,
                                       KdItemKind   kind,
                                       GError     **error,
                                       gpointer     user_data);

/* Hands back an item (transfer full) that could not be passed on. */
typedef void     (*KdReorderDropFunc) (const char   *key,
                                       gpointer      item,
                                       KdItemKind    kind,
                                       const GError *error,
                                       gpointer      user_data);

KdReorder *kd_reorder_new   (guint              room,
                             KdReorderPassFunc  pass,
                             KdReorderDropFunc  drop,
                             gpointer           user_data);
void       kd_reorder_free  (KdReorder         *self);
void       kd_reorder_close (KdReorder         *self);
void       kd_reorder_deferred (KdReorder      *self,
                                KdTicket       *ticket);
KdOrderKey *kd_reorder_enter (KdReorder       *self,
                             const char        *key,
                             gpointer           item,
                             KdItemKind         kind,
                             char              *label,
                             guint              epoch,
                             gboolean           may_wait,
                             GError           **error);
KdTicket  *kd_reorder_claim (KdReorder         *self,
                             KdOrderKey        *order,
                             gpointer          *item,
                             KdItemKind        *kind,
                             char             **label,
                             guint             *epoch);
gboolean   kd_reorder_emit  (KdReorder         *self,
                             KdTicket          *ticket,
                             char              *key,
                             gpointer           item,
                             KdItemKind         kind,
                             GError           **error);
void       kd_reorder_leave (KdReorder         *self,
                             KdTicket          *ticket);

guint      kd_reorder_count_keys    (KdReorder *self);
void       kd_reorder_wait_sleepers (KdReorder *self,
                                     guint      n_sleeping);

G_END_DECLS
