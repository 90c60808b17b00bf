/* kd-item.c: items that are values, for languages that have no pointers
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A job's item is the application's pointer, freed by its dispatcher's
 * item-free function, or a value (kd_dispatcher_submit_value() and the
 * other *_value() calls): a GValue that kdispatch copies from the caller
 * and frees itself once the job ended. A value carries what a language
 * binding can hold: a GObject, a GVariant, a boxed type, a string, or
 * (PyGObject's GObject.TYPE_PYOBJECT) any Python object, with the
 * reference counting of its type. Copying one is a reference taken (or a
 * string copied), freeing it a reference dropped, on whichever thread the
 * job ends.
 *
 * Each job says which of the two it carries (KdItemKind), so one
 * dispatcher or pipeline takes both; through a pipeline the kind travels
 * with the item, into the next stage's job, an ordered stage's ticket and
 * what it buffers, and the sink (a value sink for values).
 */

#include "config.h"

#include "kd-item-private.h"

/* A copy of @value that kdispatch owns. */
GValue *
kd_item_new_value (const GValue *value)
{
  GValue *copy = g_new0 (GValue, 1);

  g_value_init (copy, G_VALUE_TYPE (value));
  g_value_copy (value, copy);
  return copy;
}

void
kd_item_free_value (gpointer item)
{
  GValue *value = item;

  g_value_unset (value);
  g_free (value);
}
