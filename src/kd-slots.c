/* kd-slots.c: a grow-only array whose elements never move
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * Per-worker records (a worker's counters, its releases of admission, the
 * worker itself) are read by other threads while a running dispatcher
 * gains workers: they cannot live in one array that a resize reallocates.
 * KdSlots keeps them in chunks, each made once and never moved, so an
 * element's address is stable for the array's life and a reader needs no
 * lock: it reads kd_slots_length() (acquire) and then any element below
 * it. The first chunk holds the first growth's elements (a dispatcher's
 * workers at its start), found with one comparison; after it, chunk c
 * holds 2^(c-1) elements, so the memory of the later ones is at most
 * twice what they need. Growing is the owner's, one grower at a time.
 */

#include "config.h"

#include <string.h>

#include "kd-slots-private.h"

void
kd_slots_init (KdSlots *self,
               gsize    element_size)
{
  g_assert (element_size % 64 == 0);

  memset (self, 0, sizeof *self);
  self->element_size = element_size;
}

/* The chunk after the first that holds @index, and where in it. */
static guint
later_chunk (const KdSlots *self,
             guint          index,
             guint         *offset)
{
  guint later = index - self->first_length;
  guint chunk = (guint) g_bit_storage (later + 1) - 1;

  *offset = later + 1 - (1u << chunk);
  return chunk + 1;
}

/* Element @index, beyond the first chunk. */
gpointer
kd_slots_get_later (const KdSlots *self,
                    guint          index)
{
  guint offset;
  guint chunk = later_chunk (self, index, &offset);
  guint8 *base = __atomic_load_n (&self->chunks[chunk], __ATOMIC_ACQUIRE);

  return base + (gsize) offset * self->element_size;
}

/* One grower at a time: makes the chunks that hold @length elements, then
 * publishes the length. Never shrinks. */
void
kd_slots_grow (KdSlots *self,
               guint    length)
{
  guint offset, chunk, last;

  if (length <= self->length)
    return;

  if (self->chunks[0] == NULL)
    {
      /* Read without the atomics by kd_slots_get(): published with the
       * length below, and never written again. */
      self->first_length = length;
      self->chunks[0] = g_aligned_alloc0 (length, self->element_size, 64);
    }
  else
    {
      last = later_chunk (self, length - 1, &offset);
      g_assert (last < KD_SLOTS_MAX_CHUNKS);
      for (chunk = 1; chunk <= last; chunk++)
        if (self->chunks[chunk] == NULL)
          __atomic_store_n (&self->chunks[chunk],
                            g_aligned_alloc0 ((gsize) 1 << (chunk - 1), self->element_size, 64),
                            __ATOMIC_RELEASE);
    }

  __atomic_store_n (&self->length, length, __ATOMIC_RELEASE);
}

void
kd_slots_clear (KdSlots *self)
{
  guint chunk;

  for (chunk = 0; chunk < KD_SLOTS_MAX_CHUNKS; chunk++)
    g_clear_pointer (&self->chunks[chunk], g_aligned_free);
  self->length = self->first_length = 0;
}
