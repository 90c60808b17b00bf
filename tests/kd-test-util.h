/* kd-test-util.h: gates, counters and sizes shared by the tests
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Tests never sleep to wait for something: a thread that must wait blocks on
 * a KdTestGate or KdTestCounter, and every such wait has a generous deadline
 * so that a broken guarantee shows up as a failed assertion, not a hang.
 */

#pragma once

#include <glib.h>
#include <kdispatch/kdispatch.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "kd-sync-private.h"

/* How long a test waits for something that should happen promptly before it
 * declares the guarantee broken. */
#define KD_TEST_DEADLINE_US (60 * G_TIME_SPAN_SECOND)

typedef struct
{
  GMutex   lock;
  GCond    cond;
  gboolean open;
} KdTestGate;

static inline void
kd_test_gate_init (KdTestGate *gate)
{
  g_mutex_init (&gate->lock);
  g_cond_init (&gate->cond);
  gate->open = FALSE;
}

static inline void
kd_test_gate_clear (KdTestGate *gate)
{
  g_mutex_clear (&gate->lock);
  g_cond_clear (&gate->cond);
}

static inline void
kd_test_gate_open (KdTestGate *gate)
{
  kd_mutex_lock (&gate->lock);
  gate->open = TRUE;
  g_cond_broadcast (&gate->cond);
  kd_mutex_unlock (&gate->lock);
}

/* Returns FALSE if the gate stayed shut until the deadline. */
static inline gboolean
kd_test_gate_wait_for (KdTestGate *gate,
                       gint64      timeout_us)
{
  gint64 deadline = g_get_monotonic_time () + timeout_us;
  gboolean open;

  kd_mutex_lock (&gate->lock);
  while (!gate->open && kd_cond_wait_until (&gate->cond, &gate->lock, deadline))
    ;
  open = gate->open;
  kd_mutex_unlock (&gate->lock);

  return open;
}

static inline gboolean
kd_test_gate_wait (KdTestGate *gate)
{
  return kd_test_gate_wait_for (gate, KD_TEST_DEADLINE_US);
}

/* A count that threads can wait on. */
typedef struct
{
  GMutex lock;
  GCond  cond;
  guint  value;
} KdTestCounter;

static inline void
kd_test_counter_init (KdTestCounter *counter)
{
  g_mutex_init (&counter->lock);
  g_cond_init (&counter->cond);
  counter->value = 0;
}

static inline void
kd_test_counter_clear (KdTestCounter *counter)
{
  g_mutex_clear (&counter->lock);
  g_cond_clear (&counter->cond);
}

static inline guint
kd_test_counter_add (KdTestCounter *counter,
                     guint          n)
{
  guint value;

  kd_mutex_lock (&counter->lock);
  value = counter->value += n;
  g_cond_broadcast (&counter->cond);
  kd_mutex_unlock (&counter->lock);

  return value;
}

static inline guint
kd_test_counter_get (KdTestCounter *counter)
{
  guint value;

  kd_mutex_lock (&counter->lock);
  value = counter->value;
  kd_mutex_unlock (&counter->lock);

  return value;
}

/* Returns FALSE if the count stayed below @target until the deadline. */
static inline gboolean
kd_test_counter_wait (KdTestCounter *counter,
                      guint          target)
{
  gint64 deadline = g_get_monotonic_time () + KD_TEST_DEADLINE_US;
  gboolean reached;

  kd_mutex_lock (&counter->lock);
  while (counter->value < target &&
         kd_cond_wait_until (&counter->cond, &counter->lock, deadline))
    ;
  reached = counter->value >= target;
  kd_mutex_unlock (&counter->lock);

  return reached;
}

/* Where handlers stop until the test lets them go: the test can wait until
 * a number of them have arrived, then open the gate for all. */
typedef struct
{
  KdTestGate    gate;
  KdTestCounter arrived;
} KdTestHold;

static inline void
kd_test_hold_init (KdTestHold *hold)
{
  kd_test_gate_init (&hold->gate);
  kd_test_counter_init (&hold->arrived);
}

static inline void
kd_test_hold_clear (KdTestHold *hold)
{
  kd_test_gate_clear (&hold->gate);
  kd_test_counter_clear (&hold->arrived);
}

/* In a handler: counts itself in, then blocks until the hold is released.
 * Returns FALSE if the deadline passed first. */
static inline gboolean
kd_test_hold_enter (KdTestHold *hold)
{
  kd_test_counter_add (&hold->arrived, 1);
  return kd_test_gate_wait (&hold->gate);
}

/* Returns FALSE if fewer than @n arrived before the deadline. */
static inline gboolean
kd_test_hold_wait_arrived (KdTestHold *hold,
                           guint       n)
{
  return kd_test_counter_wait (&hold->arrived, n);
}

static inline void
kd_test_hold_release (KdTestHold *hold)
{
  kd_test_gate_open (&hold->gate);
}

/* A KdHandlerFunc that does nothing and succeeds. */
static inline gboolean
kd_test_noop_handler (KdJob    *job,
                      gpointer  user_data,
                      GError  **error)
{
  return TRUE;
}

/* What a test's jobs did: kd_test_recorder_handler() notes each job's key
 * and item, in the order the handlers ran, then holds the job in @hold
 * (every job, or only the one whose item is @hold_only); and
 * kd_test_recorder_done(), a done callback, counts how the jobs ended. */
typedef struct
{
  GMutex      lock;
  KdTestHold  hold;
  gpointer    hold_only;   /* if set, only the job of this item holds */
  GPtrArray  *keys;        /* copies of the keys handlers saw, in run order */
  GPtrArray  *items;       /* their items, in the same order */
  gint        completed;   /* done without an error */
  gint        cancelled;   /* done with G_IO_ERROR_CANCELLED */
  gint        failed;      /* done with any other error */
} KdTestRecorder;

static inline void
kd_test_recorder_init (KdTestRecorder *recorder)
{
  memset (recorder, 0, sizeof *recorder);
  g_mutex_init (&recorder->lock);
  kd_test_hold_init (&recorder->hold);
  recorder->keys = g_ptr_array_new_with_free_func (g_free);
  recorder->items = g_ptr_array_new ();
}

static inline void
kd_test_recorder_clear (KdTestRecorder *recorder)
{
  g_ptr_array_unref (recorder->keys);
  g_ptr_array_unref (recorder->items);
  kd_test_hold_clear (&recorder->hold);
  g_mutex_clear (&recorder->lock);
}

/* A KdHandlerFunc; its user_data is the recorder. */
static inline gboolean
kd_test_recorder_handler (KdJob    *job,
                          gpointer  user_data,
                          GError  **error)
{
  KdTestRecorder *recorder = user_data;
  gpointer item = kd_job_get_item (job);

  kd_mutex_lock (&recorder->lock);
  g_ptr_array_add (recorder->keys, g_strdup (kd_job_get_key (job)));
  g_ptr_array_add (recorder->items, item);
  kd_mutex_unlock (&recorder->lock);

  if (recorder->hold_only == NULL || item == recorder->hold_only)
    g_assert_true (kd_test_hold_enter (&recorder->hold));
  return TRUE;
}

/* A KdDoneFunc; its user_data is the recorder. */
static inline void
kd_test_recorder_done (KdJob        *job,
                       const GError *error,
                       gpointer      user_data)
{
  KdTestRecorder *recorder = user_data;

  if (error == NULL)
    g_atomic_int_inc (&recorder->completed);
  else if (g_error_matches (error, G_IO_ERROR, G_IO_ERROR_CANCELLED))
    g_atomic_int_inc (&recorder->cancelled);
  else
    g_atomic_int_inc (&recorder->failed);
}

/* The items the handlers saw for @key (NULL: unkeyed jobs), in the order
 * they ran; free with g_ptr_array_unref(). Once the jobs ended. */
static inline GPtrArray *
kd_test_recorder_items_of (KdTestRecorder *recorder,
                           const char     *key)
{
  GPtrArray *items = g_ptr_array_new ();
  guint i;

  kd_mutex_lock (&recorder->lock);
  for (i = 0; i < recorder->keys->len; i++)
    if (g_strcmp0 (g_ptr_array_index (recorder->keys, i), key) == 0)
      g_ptr_array_add (items, g_ptr_array_index (recorder->items, i));
  kd_mutex_unlock (&recorder->lock);

  return items;
}

/* A key's turn: that its jobs run one at a time and in submission order,
 * checked without a lock (a lock would keep the jobs from overlapping). A
 * handler takes its key's turn with its job's sequence number within the
 * key, and gives it back before it returns. */
typedef struct
{
  gint  running;   /* 1 while one of the key's jobs runs */
  guint next;      /* the sequence number expected next */
} KdTestKeyTurn;

/* Counts in @overlaps a job that found another of its key running, and in
 * @out_of_order a job whose @seq is not the one expected. */
static inline void
kd_test_key_turn_take (KdTestKeyTurn *turn,
                       guint          seq,
                       gint          *overlaps,
                       gint          *out_of_order)
{
  if (!g_atomic_int_compare_and_exchange (&turn->running, 0, 1))
    g_atomic_int_inc (overlaps);
  if (turn->next != seq)
    g_atomic_int_inc (out_of_order);
  turn->next = seq + 1;
}

static inline void
kd_test_key_turn_give (KdTestKeyTurn *turn)
{
  g_atomic_int_set (&turn->running, 0);
}

/* Sizes are multiplied by KD_TEST_SCALE (the valgrind setup makes them
 * smaller) and grow under `-m slow`. */
static inline guint
kd_test_size (guint normal,
              guint slow)
{
  const char *scale = g_getenv ("KD_TEST_SCALE");
  double factor = scale != NULL ? g_ascii_strtod (scale, NULL) : 1.0;
  guint size = g_test_slow () ? slow : normal;

  if (factor <= 0.0)
    factor = 1.0;

  return MAX (1, (guint) (size * factor));
}

/* The number of kdispatch threads in this process (workers, "kd-worker-N",
 * and shutdown threads, "kd-shutdown"). Not every thread: the sanitizer
 * runtimes and GLib start helper threads of their own, and ThreadSanitizer
 * starts its background thread at the process's first pthread_create(), so
 * a test run alone (-p) would count it as one of the dispatcher's. */
static inline guint
kd_test_count_threads (void)
{
  GDir *dir = g_dir_open ("/proc/self/task", 0, NULL);
  const char *tid;
  guint n = 0;

  g_assert_nonnull (dir);
  while ((tid = g_dir_read_name (dir)) != NULL)
    {
      char *path = g_build_filename ("/proc/self/task", tid, "comm", NULL);
      char *comm = NULL;

      /* A thread that exited meanwhile has no comm any more. */
      if (g_file_get_contents (path, &comm, NULL, NULL) && g_str_has_prefix (comm, "kd-"))
        n++;
      g_free (comm);
      g_free (path);
    }
  g_dir_close (dir);

  return n;
}

/* kd_test_count_threads() once it equals @expected, or after a deadline:
 * a joined thread can still be listed in /proc for a moment after
 * pthread_join() returned (the kernel reaps it after it woke the joiner),
 * and a dispatcher shut down on its own "kd-shutdown" thread finishes a
 * moment after its last notify ran. Nothing in kdispatch says when the
 * kernel is done, so this polls; a thread really left behind still fails
 * the comparison after KD_TEST_THREADS_DEADLINE_US. */
#define KD_TEST_THREADS_DEADLINE_US (5 * G_TIME_SPAN_SECOND)

static inline guint
kd_test_threads_settle (guint expected)
{
  gint64 deadline = g_get_monotonic_time () + KD_TEST_THREADS_DEADLINE_US;
  guint n;

  while ((n = kd_test_count_threads ()) != expected && g_get_monotonic_time () < deadline)
    g_usleep (200);

  return n;
}

/* Thread limits, for the tests of what happens when no thread can be made.
 * RLIMIT_NPROC bounds the tasks (threads) of a real user, but not root's:
 * as root, the process becomes a user of its own for its real and
 * effective user (KD_TEST_UID_BASE plus its process id, so that test
 * programs running side by side never count each other's threads), keeping
 * root as its saved one to come back. Every thread of the process moves
 * with it, so the limit counts them. Where that user cannot exist (a user
 * namespace that maps fewer ids), it becomes "nobody", which other
 * processes may share. Only in a subprocess (g_test_trap_subprocess()):
 * threads this process starts meanwhile would make the count wrong. */
#define KD_TEST_UID_BASE 0x40000000
#define KD_TEST_NOBODY 65534

/* Whether kd_test_limit_threads() made this process another user. */
static gboolean kd_test_became_other_user;

/* The tasks of user @uid on the machine, from /proc. */
static inline guint
kd_test_count_user_tasks (uid_t uid)
{
  GDir *dir = g_dir_open ("/proc", 0, NULL);
  const char *pid;
  guint n = 0;

  g_assert_nonnull (dir);
  while ((pid = g_dir_read_name (dir)) != NULL)
    {
      char *path = g_build_filename ("/proc", pid, "status", NULL);
      char *status = NULL;
      const char *uid_line, *threads_line;

      if (g_ascii_isdigit (pid[0]) && g_file_get_contents (path, &status, NULL, NULL) &&
          (uid_line = strstr (status, "\nUid:\t")) != NULL &&
          (threads_line = strstr (status, "\nThreads:\t")) != NULL &&
          (uid_t) g_ascii_strtoull (uid_line + 6, NULL, 10) == uid)
        n += (guint) g_ascii_strtoull (threads_line + 10, NULL, 10);
      g_free (status);
      g_free (path);
    }
  g_dir_close (dir);

  return n;
}

/* A thread's own id, as /proc/self/task lists it. */
static inline gpointer
kd_test_own_tid (gpointer data)
{
  return GINT_TO_POINTER ((gint) gettid ());
}

/* Waits until the task @tid of this process is gone from /proc, as
 * kd_test_threads_settle() does: a joined thread's task lingers a moment. */
static inline void
kd_test_task_settle (gint tid)
{
  g_autofree char *path = g_strdup_printf ("/proc/self/task/%d", tid);
  gint64 deadline = g_get_monotonic_time () + KD_TEST_THREADS_DEADLINE_US;

  while (g_file_test (path, G_FILE_TEST_EXISTS) && g_get_monotonic_time () < deadline)
    g_usleep (200);
  g_assert_false (g_file_test (path, G_FILE_TEST_EXISTS));
}

/* From now on, at most @extra more threads can be made. */
static inline void
kd_test_limit_threads (guint extra)
{
  struct rlimit limit;
  uid_t uid = getuid ();

  /* ThreadSanitizer starts a thread of its own at the process's first
   * pthread_create(): let it, before counting; and let the thread that
   * made it go, which the count would take for one that stays (its exit
   * would leave room for one more). */
  kd_test_task_settle (GPOINTER_TO_INT (g_thread_join (g_thread_new ("kd-test-first",
                                                                       kd_test_own_tid, NULL))));

  if (uid == 0)
    {
      uid = KD_TEST_UID_BASE + (uid_t) getpid ();
      if (setresuid (uid, uid, 0) != 0)
        {
          uid = KD_TEST_NOBODY;
          g_assert_cmpint (setresuid (uid, uid, 0), ==, 0);
        }
      kd_test_became_other_user = TRUE;
    }
  g_assert_cmpint (getrlimit (RLIMIT_NPROC, &limit), ==, 0);
  limit.rlim_cur = kd_test_count_user_tasks (uid) + extra;
  g_assert_cmpint (setrlimit (RLIMIT_NPROC, &limit), ==, 0);
}

/* Threads can be made again (up to the hard limit), and root is root. */
static inline void
kd_test_unlimit_threads (void)
{
  struct rlimit limit;

  g_assert_cmpint (getrlimit (RLIMIT_NPROC, &limit), ==, 0);
  limit.rlim_cur = limit.rlim_max;
  g_assert_cmpint (setrlimit (RLIMIT_NPROC, &limit), ==, 0);
  if (kd_test_became_other_user)
    g_assert_cmpint (setresuid (0, 0, 0), ==, 0);
  kd_test_became_other_user = FALSE;
}

/* A small, fast, per-thread pseudo-random generator for job lengths. */
static inline guint32
kd_test_xorshift (guint32 *state)
{
  guint32 x = *state;

  x ^= x << 13;
  x ^= x >> 17;
  x ^= x << 5;
  return *state = x;
}

/* Busy work the compiler cannot remove: simulates a job's length. */
static inline guint64
kd_test_spin (guint iterations)
{
  volatile guint64 sink = 0;
  guint i;

  for (i = 0; i < iterations; i++)
    sink += i;

  return sink;
}

/* Iterates @context until @done returns TRUE; FALSE if it still did not
 * after KD_TEST_DEADLINE_US. The caller's thread must own or be able to
 * acquire @context. */
static inline gboolean
kd_test_timed_out_cb (gpointer user_data)
{
  *(gboolean *) user_data = TRUE;
  return G_SOURCE_REMOVE;
}

static inline gboolean
kd_test_iterate_until (GMainContext *context,
                       gboolean    (*done) (gpointer user_data),
                       gpointer      user_data)
{
  GSource *deadline = g_timeout_source_new (KD_TEST_DEADLINE_US / 1000);
  gboolean timed_out = FALSE;

  g_source_set_callback (deadline, kd_test_timed_out_cb, &timed_out, NULL);
  g_source_attach (deadline, context);
  while (!done (user_data) && !timed_out)
    g_main_context_iteration (context, TRUE);
  g_source_destroy (deadline);
  g_source_unref (deadline);

  return done (user_data);
}

