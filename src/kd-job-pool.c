/* kd-job-pool.c: job records recycled instead of malloc'd per job
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * A job record is allocated by the submitting thread (a plain unkeyed
 * job's by the worker that takes its item from the scheduler's ring) and
 * freed by the worker (or the main-context thread) that ended the job.
 * With malloc that is a cross-thread free on most jobs: the freeing
 * thread's cache fills up, the allocating thread's runs dry, and both meet
 * on the allocator's arena lock.
 *
 * The pool is a magazine allocator, the design of Bonwick's slab magazines
 * and GLib's old GSlice: each thread keeps a private stack of free records
 * (no lock, no atomic); when a freeing thread's stack grows past two
 * magazines it hands one magazine (MAGAZINE_SIZE records, linked) to a
 * shared depot, and an allocating thread whose stack is empty takes a whole
 * magazine back from it. The depot lock is thus taken once per
 * MAGAZINE_SIZE records, and only by threads that are out of balance. The
 * depot keeps at most DEPOT_MAX magazines; beyond that records go back to
 * malloc. An exiting thread gives its full magazines to the depot and the
 * rest of its records to malloc.
 *
 * All dispatchers share the pool (records are all the same size). Under
 * AddressSanitizer a free record is poisoned, so a use after free is still
 * reported even though the memory is recycled.
 */

#include "config.h"

#include "kd-job-pool-private.h"
#include "kd-sync-private.h"

#if defined(__SANITIZE_ADDRESS__)
# define KD_ASAN 1
#elif defined(__has_feature)
# if __has_feature(address_sanitizer)
#  define KD_ASAN 1
# endif
#endif

#ifdef KD_ASAN
# include <sanitizer/asan_interface.h>
# define POISON(job)   ASAN_POISON_MEMORY_REGION ((char *) (job) + sizeof (KdTask), \
                                                 sizeof (KdJob) - sizeof (KdTask))
# define UNPOISON(job) ASAN_UNPOISON_MEMORY_REGION ((job), sizeof (KdJob))
#else
# define POISON(job)   ((void) 0)
# define UNPOISON(job) ((void) 0)
#endif

#define MAGAZINE_SIZE 64
#define DEPOT_MAX     64

/* A thread's free records, linked through task.next. */
typedef struct
{
  KdTask *head;
  guint   length;
} Cache;

static GMutex  depot_lock;
static KdTask *depot[DEPOT_MAX];  /* magazines: chains of MAGAZINE_SIZE records */
static guint   depot_length;

static void cache_free (gpointer data);

/* The cache is reached through compiler TLS, a couple of instructions; the
 * GPrivate holds the same pointer only so that cache_free() runs when the
 * thread exits (pthread_getspecific costs ~30 instructions per call). */
static KD_THREAD_LOCAL Cache *thread_cache;
static GPrivate thread_cache_owner = G_PRIVATE_INIT (cache_free);

static void
free_chain (KdTask *chain)
{
  while (chain != NULL)
    {
      KdTask *next = chain->next;

      UNPOISON (chain);
      g_free (chain);
      chain = next;
    }
}

/* Moves the top MAGAZINE_SIZE records of @cache to the depot, or to malloc
 * if the depot is full. */
static void
give_magazine (Cache *cache)
{
  KdTask *magazine = cache->head;
  KdTask *last = magazine;
  gboolean kept = FALSE;
  guint i;

  for (i = 1; i < MAGAZINE_SIZE; i++)
    last = last->next;
  cache->head = last->next;
  cache->length -= MAGAZINE_SIZE;
  last->next = NULL;

  kd_mutex_lock (&depot_lock);
  if (depot_length < DEPOT_MAX)
    {
      depot[depot_length++] = magazine;
      kept = TRUE;
    }
  kd_mutex_unlock (&depot_lock);

  if (!kept)
    free_chain (magazine);
}

/* At thread exit: full magazines go to the depot, the rest to malloc. */
static void
cache_free (gpointer data)
{
  Cache *cache = data;

  thread_cache = NULL;
  while (cache->length >= MAGAZINE_SIZE)
    give_magazine (cache);
  free_chain (cache->head);
  g_free (cache);
}

static Cache *
get_cache (void)
{
  Cache *cache = thread_cache;

  if (G_UNLIKELY (cache == NULL))
    {
      cache = thread_cache = g_new0 (Cache, 1);
      g_private_set (&thread_cache_owner, cache);
    }

  return cache;
}

/* An uninitialized job record. */
KdJob *
kd_job_pool_alloc (void)
{
  Cache *cache = get_cache ();
  KdTask *task;

  if (G_UNLIKELY (cache->head == NULL))
    {
      kd_mutex_lock (&depot_lock);
      if (depot_length > 0)
        {
          cache->head = depot[--depot_length];
          cache->length = MAGAZINE_SIZE;
        }
      kd_mutex_unlock (&depot_lock);

      if (cache->head == NULL)
        return g_new (KdJob, 1);
    }

  task = cache->head;
  UNPOISON (task);
  cache->head = task->next;
  cache->length--;
  /* The next record was most likely freed by another thread, so its line is
   * in another core's cache: start fetching it now, for writing, so the
   * miss overlaps with the rest of this submit instead of stalling the
   * next one. */
  if (cache->head != NULL)
    __builtin_prefetch (cache->head, 1, 3);
  /* The record crossed threads through the depot's lock or a scheduler
   * queue; tell ThreadSanitizer it is this thread's now. */
  kd_tsan_acquire (task);

  return (KdJob *) task;
}

void
kd_job_pool_free (KdJob *job)
{
  Cache *cache = get_cache ();
  KdTask *task = &job->task;

  kd_tsan_release (task);
  task->next = cache->head;
  cache->head = task;
  cache->length++;
  POISON (job);

  if (G_UNLIKELY (cache->length >= 2 * MAGAZINE_SIZE))
    give_magazine (cache);
}
