/* kd-shutdown.c: finishing a shutdown that cannot wait where it began
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The last unref of a dispatcher or a pipeline closes it, waits for its
 * jobs and joins its threads. When it happens on one of the object's own
 * threads (a worker running a handler or a done callback, the timer's
 * thread freeing an idle key state, a main context delivering its done
 * callbacks or notifying its counters) that thread cannot wait for itself.
 * Both objects' dispose is kd_shutdown_dispose(), once per object (a
 * KdShutdown records how far it got): elsewhere it runs the whole
 * shutdown (the finish) at once; on one of the object's threads it closes
 * the object, keeps it alive with a reference and hands the finish to
 * shutdown_later(), which runs it where it can wait, and then drops the
 * reference:
 *
 *  - On one of the object's workers or its timer's thread (they call
 *    kd_shutdown_thread_enter() as they start): as that thread exits. It
 *    exits once its dispatcher, closed, has drained, so the finish waits
 *    for nothing of its own (a pipeline's waits for the stages after that
 *    one, which never wait for an earlier stage); it joins the object's
 *    other threads and lets its own go (kd_scheduler_join(),
 *    kd_timer_join()). The thread no longer counts as the object's by
 *    then. No thread is made, so this cannot fail.
 *  - Elsewhere (a main context's thread, even if it is another
 *    dispatcher's worker, or a thread that ends one of the object's jobs,
 *    returning a deferred one, which it would wait for): on a new thread,
 *    so that the context (or the thread) goes on while the object drains. If no thread can be
 *    made, from an idle source of the context being dispatched, once its
 *    dispatch returned: the context's thread then waits for the object's
 *    jobs. With no such context either (a case no caller of kdispatch can
 *    reach today), a critical says so and the object stays alive, closed.
 *
 * Either way the last unref returns at once and every accepted job still
 * ends; the object's destroy notifies run where the finish runs.
 */

#include "config.h"

#include "kd-shutdown-private.h"
#include "kd-sync-private.h"

typedef struct _Deferred Deferred;

struct _Deferred
{
  Deferred       *next;
  GObject        *object;   /* a reference */
  KdShutdown     *shutdown; /* the object's */
  KdShutdownFunc  finish;
};

enum
{
  SHUTDOWN_NONE,
  SHUTDOWN_ASYNC,  /* shutdown_later() finishes the shutdown */
  SHUTDOWN_DONE,
};

/* On a thread that runs deferred finishes as it exits: whether it does,
 * and the finishes left to it, newest first. */
static KD_THREAD_LOCAL gboolean  runs_deferred;
static KD_THREAD_LOCAL Deferred *deferred;

/* Runs @object's @finish and records its shutdown done. */
static void
run_finish (KdShutdown     *shutdown,
            KdShutdownFunc  finish,
            GObject        *object)
{
  finish (object);
  g_atomic_int_set (&shutdown->state, SHUTDOWN_DONE);
}

static Deferred *
deferred_new (GObject        *object,
              KdShutdown     *shutdown,
              KdShutdownFunc  finish)
{
  Deferred *d = g_new0 (Deferred, 1);

  d->object = g_object_ref (object);
  d->shutdown = shutdown;
  d->finish = finish;
  return d;
}

static void
deferred_run (Deferred *d)
{
  run_finish (d->shutdown, d->finish, d->object);
  g_object_unref (d->object);
  g_free (d);
}

static gpointer
finish_thread_main (gpointer data)
{
  deferred_run (data);
  return NULL;
}

static gboolean
finish_in_idle (gpointer data)
{
  deferred_run (data);
  return G_SOURCE_REMOVE;
}

/* Takes a reference to @object, runs @finish where it may wait for
 * @object's threads (see the design above), then drops the reference.
 * @dispatching: the main context whose dispatch dropped the last
 * reference; NULL if it went on one of the object's own workers or timer. */
static void
shutdown_later (KdShutdown      *shutdown,
                KdShutdownFunc   finish,
                GObject         *object,
                KdShutdownPlace  place,
                GMainContext    *dispatching)
{
  Deferred *d = deferred_new (object, shutdown, finish);
  g_autoptr (GError) error = NULL;
  GThread *thread;
  GSource *idle;

  /* Only the object's own worker or timer finishes it as it exits: one of
   * another dispatcher's, dispatching this object's main context, might
   * never exit. */
  if (place == KD_SHUTDOWN_OWN_THREAD && runs_deferred && dispatching == NULL)
    {
      d->next = deferred;
      deferred = d;
      return;
    }

  thread = g_thread_try_new ("kd-shutdown", finish_thread_main, d, &error);
  if (thread != NULL)
    {
      g_thread_unref (thread);
      return;
    }

  if (dispatching != NULL)
    {
      g_debug ("%s %p: no thread to shut down on (%s): shutting down from its main context",
               G_OBJECT_TYPE_NAME (object), (gpointer) object, error->message);
      idle = g_idle_source_new ();
      g_source_set_callback (idle, finish_in_idle, d, NULL);
      g_source_set_static_name (idle, "kdispatch shutdown");
      g_source_attach (idle, dispatching);
      g_source_unref (idle);
      return;
    }

  g_critical ("%s %p: its last reference went on a thread of its own, and no thread "
              "could be made to finish its shutdown (%s): it stays alive, closed",
              G_OBJECT_TYPE_NAME (object), (gpointer) object, error->message);
  g_free (d);   /* its reference stays with the object */
}

/*
 * kd_shutdown_dispose:
 * @shutdown: @object's record, zero-initialised with the object
 * @object: a dispatcher or pipeline in its dispose
 * @place: where the last reference went: one of @object's threads, a
 *   thread ending one of its jobs, or another thread
 * @dispatching: (nullable): the main context of @object's whose dispatch
 *   runs on this thread, if any
 * @close: closes @object, so that it drains, without waiting
 * @finish: the rest of the shutdown: waits for @object's jobs and joins
 *   its threads
 *
 * Shuts @object down, once: at once, or (on one of its own threads or
 * from one of its contexts' dispatch) after @close, later (see the design
 * above).
 */
void
kd_shutdown_dispose (KdShutdown      *shutdown,
                     GObject         *object,
                     KdShutdownPlace  place,
                     GMainContext    *dispatching,
                     KdShutdownFunc   close,
                     KdShutdownFunc   finish)
{
  if (g_atomic_int_get (&shutdown->state) != SHUTDOWN_NONE)
    return;

  if (place != KD_SHUTDOWN_ELSEWHERE || dispatching != NULL)
    {
      g_debug ("%s %p: last unref on its own thread, shutting down in the background",
               G_OBJECT_TYPE_NAME (object), (gpointer) object);
      g_atomic_int_set (&shutdown->state, SHUTDOWN_ASYNC);
      close (object);
      shutdown_later (shutdown, finish, object, place, dispatching);
    }
  else
    {
      run_finish (shutdown, finish, object);
    }
}

/* Whether @shutdown finished (its object may be finalized). */
gboolean
kd_shutdown_is_done (KdShutdown *shutdown)
{
  return g_atomic_int_get (&shutdown->state) == SHUTDOWN_DONE;
}

/* On a worker's or the timer's thread, as it starts: the shutdowns that
 * begin on this thread are finished as it exits. */
void
kd_shutdown_thread_enter (void)
{
  runs_deferred = TRUE;
}

/* Whether shutdowns were left to this thread: it must not exit before its
 * object drained (a worker retiring early keeps running). */
gboolean
kd_shutdown_thread_has_finishes (void)
{
  return deferred != NULL;
}

/* On a worker leaving before the shutdown (without finishes left to it,
 * see kd_shutdown_thread_has_finishes()): shutdowns that begin on it from
 * now on go to a thread of their own, as elsewhere. */
void
kd_shutdown_thread_leave (void)
{
  g_assert (deferred == NULL);
  runs_deferred = FALSE;
}

/* As that thread exits, after its last look at its scheduler or timer:
 * finishes the shutdowns left to it, which may free them. */
void
kd_shutdown_thread_exit (void)
{
  runs_deferred = FALSE;
  while (deferred != NULL)
    {
      Deferred *d = deferred;

      deferred = d->next;
      deferred_run (d);
    }
}
