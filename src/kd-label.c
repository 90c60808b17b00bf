/* kd-label.c: the key an item carries through a pipeline
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A pipeline's item keeps its key from stage to stage, also through the
 * parallel and ordered stages, where no key orders it: each job holds the
 * key as a label, a reference-counted string that a handler's emit passes
 * on to the next stage without copying it. A label is the string itself
 * (a plain `char *` to whoever reads it), with its count just before it.
 * Not GRefString: its counting happens inside GLib, where ThreadSanitizer
 * cannot see the ordering it gives.
 */

#include "config.h"

#include <string.h>

#include "kd-label-private.h"

typedef struct
{
  gint ref_count;
  char string[];
} Label;

#define LABEL_OF(chars) ((Label *) (void *) ((char *) (chars) - G_STRUCT_OFFSET (Label, string)))

/* (nullable): NULL for NULL. */
char *
kd_label_new (const char *key)
{
  gsize size;
  Label *label;

  if (key == NULL)
    return NULL;

  size = strlen (key) + 1;
  label = g_malloc (sizeof (Label) + size);
  label->ref_count = 1;
  memcpy (label->string, key, size);

  /* The string inside the allocation (said this way so that static
   * analysers see the allocation is returned, not leaked). */
  return (char *) label + G_STRUCT_OFFSET (Label, string);
}

char *
kd_label_ref (char *label)
{
  if (label != NULL)
    g_atomic_int_inc (&LABEL_OF (label)->ref_count);
  return label;
}

void
kd_label_unref (char *label)
{
  if (label != NULL && g_atomic_int_dec_and_test (&LABEL_OF (label)->ref_count))
    g_free (LABEL_OF (label));
}
