/* kd-task-private.h: the unit of work the scheduler moves, and FIFO lists of it
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

/* Embedded at the start of everything the scheduler runs (an unkeyed job, a
 * ready mailbox), so queues link them without allocating. */
typedef struct _KdTask KdTask;

struct _KdTask
{
  KdTask *next;
  guint   kind;  /* a KdTaskKind */
  guint   band;  /* a KdBand: where it waits among ready tasks */
};

/* The priority classes of ready tasks, from GLib's priorities
 * (kd_band_for_priority()). KD_BAND_DEFAULT is 0, so a task that sets none
 * has it. */
typedef enum
{
  KD_BAND_DEFAULT,  /* 0 to 99: G_PRIORITY_DEFAULT */
  KD_BAND_HIGH,     /* below 0: G_PRIORITY_HIGH */
  KD_BAND_LOW,      /* 100 and above: G_PRIORITY_HIGH_IDLE, _DEFAULT_IDLE, G_PRIORITY_LOW */
} KdBand;

static inline KdBand
kd_band_for_priority (gint priority)
{
  return priority < G_PRIORITY_DEFAULT ? KD_BAND_HIGH
         : priority < G_PRIORITY_HIGH_IDLE ? KD_BAND_DEFAULT
         : KD_BAND_LOW;
}

typedef enum
{
  KD_TASK_JOB,      /* an unkeyed KdJob */
  KD_TASK_MAILBOX,  /* a KdMailbox with work */
  KD_TASK_RETURNED, /* a pipeline stage's deferred KdJob, returned: a worker
                     * passes on what it emitted and ends it */
} KdTaskKind;

/* A FIFO of tasks; not thread-safe, its owner locks. */
typedef struct
{
  KdTask *head;
  KdTask *tail;
  guint   length;
} KdTaskList;

static inline void
kd_task_list_push (KdTaskList *list,
                   KdTask     *task)
{
  task->next = NULL;
  if (list->tail != NULL)
    list->tail->next = task;
  else
    list->head = task;
  list->tail = task;
  list->length++;
}

/* Detaches the first @n tasks (at most the list's length) and returns them
 * as a NULL-terminated chain; *n_taken says how many, *last is the chain's
 * last task. */
static inline KdTask *
kd_task_list_take (KdTaskList *list,
                   guint       n,
                   guint      *n_taken,
                   KdTask    **last_taken)
{
  KdTask *head = list->head;
  KdTask *last = head;
  guint i;

  n = MIN (n, list->length);
  *n_taken = n;
  *last_taken = NULL;
  if (n == 0)
    return NULL;

  for (i = 1; i < n; i++)
    last = last->next;

  list->head = last->next;
  if (list->head == NULL)
    list->tail = NULL;
  list->length -= n;
  last->next = NULL;
  *last_taken = last;

  return head;
}

/* Appends a NULL-terminated chain of @n tasks, at least one, that ends with
 * @last: no walk over the chain, whose tasks are likely in other cores'
 * caches. */
static inline void
kd_task_list_append_chain (KdTaskList *list,
                           KdTask     *chain,
                           KdTask     *last,
                           guint       n)
{
  g_assert (chain != NULL && last != NULL && n > 0);

  if (list->tail != NULL)
    list->tail->next = chain;
  else
    list->head = chain;
  list->tail = last;
  list->length += n;
}

G_END_DECLS
