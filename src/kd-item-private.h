/* kd-item-private.h: what a job carries, the application's pointer or a value
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib-object.h>

G_BEGIN_DECLS

/* Who frees a job's item once the job ended. */
typedef enum
{
  KD_ITEM_POINTER,      /* the application's: its dispatcher's item-free */
  KD_ITEM_VALUE,        /* a GValue of kdispatch's own (kd_item_new_value()) */
  KD_ITEM_HANDED_OVER,  /* kd_job_emit() passed it on: nobody, here */
} KdItemKind;

GValue *kd_item_new_value  (const GValue *value);
void    kd_item_free_value (gpointer      item);

/* Frees @item of @kind; @item_free is the dispatcher's. Inlined: it is on
 * every job's path. */
static inline void
kd_item_free (KdItemKind     kind,
              gpointer       item,
              GDestroyNotify item_free)
{
  if (G_LIKELY (kind == KD_ITEM_POINTER))
    {
      if (item_free != NULL)
        item_free (item);
    }
  else if (kind == KD_ITEM_VALUE)
    {
      kd_item_free_value (item);
    }
}

G_END_DECLS
