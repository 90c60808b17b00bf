/* kd-slots-private.h: a grow-only array whose elements never move
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

/* After the first chunk, chunk c holds 2^(c-1) elements: 11 more chunks
 * hold 2047 elements, more than KD_DISPATCHER_MAX_WORKERS + 1. */
#define KD_SLOTS_MAX_CHUNKS 12

typedef struct
{
  gsize    element_size;                 /* a multiple of 64: a cache line each */
  guint    length;                       /* atomic: elements readable */
  guint    first_length;                 /* elements in chunks[0]: the first growth's */
  gpointer chunks[KD_SLOTS_MAX_CHUNKS];  /* atomic: each made once, zeroed */
} KdSlots;

void     kd_slots_init      (KdSlots *self,
                             gsize    element_size);
void     kd_slots_grow      (KdSlots *self,
                             guint    length);
void     kd_slots_clear     (KdSlots *self);
gpointer kd_slots_get_later (const KdSlots *self,
                             guint          index);

/* The number of elements, each readable and zeroed when it became one. */
static inline guint
kd_slots_length (const KdSlots *self)
{
  return __atomic_load_n (&self->length, __ATOMIC_ACQUIRE);
}

/* Element @index, below kd_slots_length() as the caller saw it: in the
 * first chunk (the elements of the first growth, the common case) with
 * one comparison. @element_size is the one the slots were made with, as a
 * constant (see KD_SLOTS_GET()). */
G_ALWAYS_INLINE static inline gpointer
kd_slots_get (const KdSlots *self,
              guint          index,
              gsize          element_size)
{
  if (G_LIKELY (index < self->first_length))
    return (guint8 *) self->chunks[0] + (gsize) index * element_size;
  return kd_slots_get_later (self, index);
}

#define KD_SLOTS_GET(slots, index, Type) ((Type *) kd_slots_get ((slots), (index), sizeof (Type)))

G_END_DECLS
