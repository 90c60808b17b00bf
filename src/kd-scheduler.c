/* kd-scheduler.c: the bounded set of worker threads and the 2-tier fan-out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The scheduler runs tasks (KdTask: an unkeyed job, or a keyed mailbox that
 * is ready) on a fixed set of worker threads. It knows nothing about jobs or
 * keys: its owner gives it a function that runs one task.
 *
 * Tier 1 is the input queue: every task pushed from outside the workers
 * enters it. Tier 2 is the worker groups (as many as the dispatcher's
 * fan-out, kd_dispatcher_set_fanout()): each group has its own queue
 * feeding its own workers. The input queue is a
 * lock-free stack: a producer pushes with one compare-and-swap and never
 * waits for a worker (a batch pushes its whole chain of tasks with one). A worker whose group queue is empty feeds its group
 * from the input: it takes the whole stack with one atomic exchange,
 * puts it back in arrival order, runs the first task and leaves the rest in
 * its group queue for its group mates. Nobody pops single tasks off the
 * shared stack, so there is no ABA hazard, and the input's cache line moves
 * once per batch rather than once per task. A worker that finds its group
 * queue empty steals half of another group's queue before it looks at the
 * input, whose tasks are newer: no task waits behind a busy group while
 * another group's worker is idle, however much fresh input arrives.
 *
 * Waking a sleeping thread costs microseconds, so it is done only when it
 * buys parallelism. Idle workers first spin for SPIN_US (normally one at a
 * time), then park on their own GCond. Whoever makes a task visible wakes one
 * parked worker only if nobody is spinning; a worker that was woken counts
 * as spinning until it finds a task, and then wakes the next one if more
 * work is visible. That is the scheme of Go's runtime scheduler, and it
 * keeps a steady stream of short tasks from paying a wake-up per task.
 *
 * A spinner only helps while it runs, though. With more workers than
 * processors, a woken worker can wait behind the producer on the
 * producer's processor, or a spinner can be preempted, while it still counts
 * as spinning: pushers would then wake nobody and tasks would wait for a
 * whole scheduler time slice while the other processor idles. So spinners
 * stamp spin_stamp on every pass, a waker stamps it for the worker it wakes,
 * and a pusher that finds the stamp older than STALL_US, while fewer
 * workers are awake than there are processors, wakes one more worker
 * anyway (and stamps it, so stalled spinners cost at most one wake-up per
 * STALL_US).
 *
 * The "no lost wake-up" argument is the Dekker pattern on sequentially
 * consistent atomics: a pusher publishes its task (the input stack or a
 * group's n_tasks) and then reads n_spinning and n_idle; a worker going to sleep
 * publishes itself (n_idle) and drops n_spinning, and then looks at the
 * queues again. At least one of the two sees the other.
 *
 * Start and stop hooks: with a start hook, each worker runs it on its own
 * thread before it takes any task, and kd_scheduler_new() waits at a start
 * barrier for all of them; if one fails, all exit and kd_scheduler_new()
 * fails with its error. A worker runs the stop hook as it exits.
 *
 * Delayed tasks (a retry waiting out its backoff) wait in a KdTimer, whose
 * thread is made with the workers if the owner will delay tasks, and
 * pushes each when it is due;
 * kd_scheduler_hurry() makes them all due at once (cancellation). The
 * owner may put calls of its own there too (kd_scheduler_call_at()); the
 * shutdown makes them due at once.
 *
 * Shutdown: once the owner calls kd_scheduler_shutdown(), a worker that
 * finds no task exits, and so does the timer's thread; kd_scheduler_join()
 * waits for all of them. The owner
 * shuts down only when nothing is pending, so no task is left behind.
 *
 * Locks: a group's lock guards its queue, idle_lock the parked workers,
 * start_lock the start barrier, timer_lock the timer and the hurry flag,
 * join_lock the join. A thread holds at most one of a group lock and
 * idle_lock at a time; the timer's own lock is taken under timer_lock, and
 * timer_lock under join_lock, which is held while the threads are joined.
 */

#include "config.h"

#include "kd-scheduler-private.h"
#include "kd-shutdown-private.h"
#include "kd-sync-private.h"
#include "kd-timer-private.h"

/* How long the spinning worker looks for a task, yielding the processor in
 * between, before it parks: long enough to catch the next burst of a
 * producer that submits in bursts, so most jobs start without waiting for
 * a wake-up (kd-bench L1: median start latency 23-30 us -> 11-12 us, no
 * throughput cost). One worker spins at a time, unless it stalled (see
 * STALL_US). */
#define SPIN_US 60

/* How long a spinner may go without a pass before pushers stop counting on
 * it: a pass takes a microsecond or two when its thread runs. */
#define STALL_US 20

typedef struct
{
  GMutex     lock;
  KdTaskList tasks;    /* protected by @lock */
  gint       n_tasks;  /* atomic copy of tasks.length, read without the lock */
} __attribute__ ((aligned (64))) KdWorkerGroup;   /* a cache line each: groups do not share one */

struct _KdWorker
{
  /* Immutable */
  KdScheduler *scheduler;
  KdWorkerGroup     *group;
  guint        index;
  GThread     *thread;
  gpointer     data;        /* set by the start hook, on the worker's thread */

  /* Protected by scheduler->idle_lock */
  GCond        cond;
  KdWorker    *next_idle;
  gboolean     woken;
};

struct _KdScheduler
{
  /* Immutable */
  KdTaskFunc  func;
  KdWorkerStartFunc start;
  KdWorkerStopFunc  stop;
  gpointer    user_data;
  guint       n_workers;
  guint       n_groups;
  guint       n_processors;
  KdWorker   *workers;
  KdWorkerGroup    *groups;

  /* Tier 1: atomic, a stack of tasks linked through task->next, newest first */
  KdTask     *input;

  /* Idle workers */
  GMutex      idle_lock;
  KdWorker   *idle;        /* stack of parked workers, protected by @idle_lock */
  gint        n_idle;      /* atomic: workers on the stack */
  gint        n_spinning;  /* atomic: workers awake and looking for a task */
  gint64      spin_stamp;  /* atomic: when a spinner last ran, or was woken */
  gint        shutting_down; /* atomic */

  /* The start barrier (with start hooks only), protected by @start_lock:
   * workers that ran their start hook, the first failure, and whether they
   * may go on (START_GO) or must stop (START_ABORT) */
  GMutex      start_lock;
  GCond       start_cond;
  guint       n_started;
  GError     *start_error;
  gint        start_verdict;

  /* Delayed tasks (kd_scheduler_push_at()): a timer thread, made with
   * the scheduler if asked for, or at the owner's first delay
   * (kd_scheduler_ensure_timer()), under @timer_lock; taken out under it
   * when joined.
   * Once @hurried, every delay is over (kd_scheduler_sleep_until() too). */
  GMutex      timer_lock;
  GCond       hurry_cond;
  KdTimer    *timer;
  gboolean    hurried;

  /* Protected by @join_lock */
  GMutex      join_lock;
  gboolean    joined;
};

enum
{
  START_PENDING,
  START_GO,
  START_ABORT,
};

/* The worker running on this thread: compiler TLS, read on every submit. */
static KD_THREAD_LOCAL KdWorker *current_worker;

static gboolean
work_visible (KdScheduler *self)
{
  guint i;

  if (__atomic_load_n (&self->input, __ATOMIC_SEQ_CST) != NULL)
    return TRUE;
  for (i = 0; i < self->n_groups; i++)
    if (g_atomic_int_get (&self->groups[i].n_tasks) > 0)
      return TRUE;
  return FALSE;
}

/* Whether the workers counted as spinning have not run for STALL_US while
 * a processor may be free for one more: fewer workers are awake than there
 * are processors. (With as many awake, another one would only take turns
 * with them, and a wake-up every STALL_US costs a throughput workload half
 * its speed: kd-bench W2 fell from 9.3 to 1.7-2.5 M/s in some runs.) */
static gboolean
spinners_stalled (KdScheduler *self)
{
  return self->n_workers - (guint) g_atomic_int_get (&self->n_idle) < self->n_processors &&
         g_get_monotonic_time () - __atomic_load_n (&self->spin_stamp, __ATOMIC_RELAXED) > STALL_US;
}

/* Wakes one parked worker, which starts out spinning. Does nothing if a
 * worker is already spinning and running: that one will find the work. */
static void
wake_one (KdScheduler *self)
{
  for (;;)
    {
      KdWorker *worker;
      gint spinning = g_atomic_int_get (&self->n_spinning);

      if (g_atomic_int_get (&self->n_idle) == 0 ||
          (spinning > 0 && !spinners_stalled (self)))
        return;
      if (!g_atomic_int_compare_and_exchange (&self->n_spinning, spinning, spinning + 1))
        continue;

      kd_mutex_lock (&self->idle_lock);
      worker = self->idle;
      if (worker != NULL)
        {
          self->idle = worker->next_idle;
          g_atomic_int_add (&self->n_idle, -1);
          worker->woken = TRUE;
          __atomic_store_n (&self->spin_stamp, g_get_monotonic_time (), __ATOMIC_RELAXED);
          g_cond_signal (&worker->cond);
        }
      kd_mutex_unlock (&self->idle_lock);

      if (worker != NULL)
        return;

      /* Nobody was parked after all. While we held n_spinning up, a
       * pusher may have skipped its wake-up and a worker may have parked:
       * look again now that n_spinning is back down. */
      g_atomic_int_add (&self->n_spinning, -1);
      if (!work_visible (self))
        return;
    }
}

static void
wake_if_useful (KdScheduler *self)
{
  if (g_atomic_int_get (&self->n_idle) > 0 && work_visible (self))
    wake_one (self);
}

static KdTask *
group_pop (KdWorkerGroup *group)
{
  KdTask *task;
  KdTask *last;
  guint n;

  if (g_atomic_int_get (&group->n_tasks) == 0)
    return NULL;

  kd_mutex_lock (&group->lock);
  task = kd_task_list_take (&group->tasks, 1, &n, &last);
  if (n > 0)
    g_atomic_int_add (&group->n_tasks, -1);
  kd_mutex_unlock (&group->lock);

  return task;
}

/* Keeps the first task of @chain (@n tasks, the last one @last) and queues
 * the rest in @group. */
static KdTask *
keep_first (KdWorkerGroup *group,
            KdTask  *chain,
            KdTask  *last,
            guint    n)
{
  if (n > 1)
    {
      kd_mutex_lock (&group->lock);
      kd_task_list_append_chain (&group->tasks, chain->next, last, n - 1);
      g_atomic_int_add (&group->n_tasks, (gint) n - 1);
      kd_mutex_unlock (&group->lock);
    }
  chain->next = NULL;
  return chain;
}

/* Feeds @group from the input: takes the whole input stack, and
 * returns its oldest task, leaving the others in the group queue in arrival
 * order. */
static KdTask *
fetch_input (KdScheduler *self,
             KdWorkerGroup     *group)
{
  KdTask *newest;
  KdTask *chain = NULL;
  KdTask *last;
  guint n = 0;

  if (__atomic_load_n (&self->input, __ATOMIC_RELAXED) == NULL)
    return NULL;

  newest = last = __atomic_exchange_n (&self->input, NULL, __ATOMIC_SEQ_CST);
  while (newest != NULL)
    {
      KdTask *next = newest->next;

      newest->next = chain;
      chain = newest;
      newest = next;
      n++;
    }

  return n > 0 ? keep_first (group, chain, last, n) : NULL;
}

/* Takes half of another group's queue. */
static KdTask *
steal (KdScheduler *self,
       KdWorker    *worker)
{
  guint own = (guint) (worker->group - self->groups);
  guint i;

  for (i = 1; i < self->n_groups; i++)
    {
      KdWorkerGroup *victim = &self->groups[(own + i) % self->n_groups];
      KdTask *chain;
      KdTask *last;
      guint n;

      if (g_atomic_int_get (&victim->n_tasks) == 0)
        continue;

      kd_mutex_lock (&victim->lock);
      chain = kd_task_list_take (&victim->tasks, (victim->tasks.length + 1) / 2, &n, &last);
      if (n > 0)
        g_atomic_int_add (&victim->n_tasks, -(gint) n);
      kd_mutex_unlock (&victim->lock);

      if (n > 0)
        return keep_first (worker->group, chain, last, n);
    }

  return NULL;
}

static KdTask *
find_task (KdWorker *worker)
{
  KdScheduler *self = worker->scheduler;
  KdTask *task;

  if ((task = group_pop (worker->group)) != NULL)
    return task;
  /* Other groups' queues hold tasks older than anything in the input: look
   * there first, or a task left behind a busy group's long job would wait
   * for as long as fresh input keeps coming. */
  if ((task = steal (self, worker)) != NULL)
    return task;
  return fetch_input (self, worker->group);
}

static KdTask *
spin_for_task (KdWorker *worker)
{
  KdScheduler *self = worker->scheduler;
  gint64 now = g_get_monotonic_time ();
  gint64 until = now + SPIN_US;

  do
    {
      KdTask *task;

      __atomic_store_n (&self->spin_stamp, now, __ATOMIC_RELAXED);
      if (g_atomic_int_get (&self->shutting_down))
        return NULL;
      g_thread_yield ();
      if ((task = find_task (worker)) != NULL)
        return task;
    }
  while ((now = g_get_monotonic_time ()) < until);

  return NULL;
}

/* Sleeps until woken. On return *spinning says whether the waker counted
 * this worker as spinning. */
static void
park (KdWorker *worker,
      gboolean *spinning)
{
  KdScheduler *self = worker->scheduler;

  kd_mutex_lock (&self->idle_lock);
  worker->woken = FALSE;
  worker->next_idle = self->idle;
  self->idle = worker;
  g_atomic_int_add (&self->n_idle, 1);
  kd_mutex_unlock (&self->idle_lock);

  if (*spinning)
    {
      *spinning = FALSE;
      g_atomic_int_add (&self->n_spinning, -1);
    }

  kd_mutex_lock (&self->idle_lock);
  if (!worker->woken &&
      (work_visible (self) || g_atomic_int_get (&self->shutting_down)))
    {
      /* A task arrived (or shutdown began) while we were announcing
       * ourselves: take ourselves off the stack and look again. */
      KdWorker **link = &self->idle;

      while (*link != worker)
        link = &(*link)->next_idle;
      *link = worker->next_idle;
      g_atomic_int_add (&self->n_idle, -1);
    }
  else
    {
      while (!worker->woken)
        kd_cond_wait (&worker->cond, &self->idle_lock);
      *spinning = TRUE;
    }
  kd_mutex_unlock (&self->idle_lock);
}

/* Runs the start hook on the worker's thread, then waits at the start
 * barrier until every worker ran its own. FALSE if the worker must exit
 * because one of them failed (having run its stop hook if its start
 * succeeded). */
static gboolean
start_worker (KdWorker *worker)
{
  KdScheduler *self = worker->scheduler;
  GError *error = NULL;
  gboolean started = self->start (worker, self->user_data, &error);
  gint verdict;

  kd_mutex_lock (&self->start_lock);
  self->n_started++;
  if (!started && self->start_error == NULL)
    self->start_error = g_steal_pointer (&error);
  g_cond_broadcast (&self->start_cond);
  while (self->start_verdict == START_PENDING)
    kd_cond_wait (&self->start_cond, &self->start_lock);
  verdict = self->start_verdict;
  kd_mutex_unlock (&self->start_lock);

  g_clear_error (&error);
  if (verdict == START_GO)
    return TRUE;

  if (started && self->stop != NULL)
    self->stop (worker, self->user_data);
  return FALSE;
}

static gpointer
worker_main (gpointer data)
{
  KdWorker *worker = data;
  KdScheduler *self = worker->scheduler;
  gboolean spinning = FALSE;

  kd_tsan_acquire (worker);
  current_worker = worker;
  kd_shutdown_thread_enter ();

  if (self->start != NULL && !start_worker (worker))
    {
      current_worker = NULL;
      kd_tsan_release (worker);
      kd_shutdown_thread_exit ();
      return NULL;
    }

  for (;;)
    {
      KdTask *task = find_task (worker);

      if (task == NULL && !spinning &&
          g_atomic_int_compare_and_exchange (&self->n_spinning, 0, 1))
        spinning = TRUE;

      if (task == NULL && spinning)
        task = spin_for_task (worker);

      if (task == NULL)
        {
          if (g_atomic_int_get (&self->shutting_down))
            break;
          park (worker, &spinning);
          continue;
        }

      if (spinning)
        {
          spinning = FALSE;
          g_atomic_int_add (&self->n_spinning, -1);
        }
      wake_if_useful (self);

      self->func (task, worker, self->user_data);
    }

  if (spinning)
    g_atomic_int_add (&self->n_spinning, -1);

  if (self->stop != NULL)
    self->stop (worker, self->user_data);

  current_worker = NULL;
  kd_tsan_release (worker);

  /* Last: a shutdown left to this thread may free the scheduler. */
  kd_shutdown_thread_exit ();
  return NULL;
}

/* Waits until every worker ran its start hook and tells them whether to go
 * on. FALSE with the first failure's error if one of them failed. */
static gboolean
await_start (KdScheduler  *self,
             GError      **error)
{
  gboolean started;

  kd_mutex_lock (&self->start_lock);
  while (self->n_started < self->n_workers)
    kd_cond_wait (&self->start_cond, &self->start_lock);
  started = self->start_error == NULL;
  self->start_verdict = started ? START_GO : START_ABORT;
  if (!started)
    g_propagate_error (error, g_steal_pointer (&self->start_error));
  g_cond_broadcast (&self->start_cond);
  kd_mutex_unlock (&self->start_lock);

  return started;
}

/* A thread could not be made: the workers made so far stop (those that ran
 * their start hook run their stop hook) and are joined, and the scheduler
 * goes. */
static void
abort_start (KdScheduler *self)
{
  kd_mutex_lock (&self->start_lock);
  self->start_verdict = START_ABORT;
  g_cond_broadcast (&self->start_cond);
  kd_mutex_unlock (&self->start_lock);

  kd_scheduler_shutdown (self);
  kd_scheduler_join (self);
  kd_scheduler_free (self);
}

/*
 * kd_scheduler_new:
 *
 * Starts @n_workers threads split into @n_groups groups (at most one group
 * per worker) as evenly as possible, and, @with_timer, the timer's thread
 * for kd_scheduler_push_at() and kd_scheduler_call_at(). With a @start
 * hook, each worker runs it on its thread first, and this call returns once
 * all of them did: if one failed, every worker exits (those whose start
 * succeeded run @stop) and it returns %NULL with the first error. If a
 * thread cannot be made, the threads made so far exit the same way and it
 * returns %NULL with the thread error (%G_THREAD_ERROR_AGAIN). @stop runs
 * on each worker's thread as it exits.
 */
KdScheduler *
kd_scheduler_new (guint              n_workers,
                  guint              n_groups,
                  gboolean           with_timer,
                  KdTaskFunc         func,
                  KdWorkerStartFunc  start,
                  KdWorkerStopFunc   stop,
                  gpointer           user_data,
                  GError           **error)
{
  KdScheduler *self;
  guint i;

  g_assert (n_workers > 0);

  self = g_new0 (KdScheduler, 1);
  self->func = func;
  self->start = start;
  self->stop = stop;
  self->user_data = user_data;
  self->n_workers = n_workers;
  self->n_groups = CLAMP (n_groups, 1, n_workers);
  self->n_processors = g_get_num_processors ();
  self->workers = g_new0 (KdWorker, n_workers);
  self->groups = g_aligned_alloc0 (self->n_groups, sizeof (KdWorkerGroup), G_ALIGNOF (KdWorkerGroup));
  g_mutex_init (&self->idle_lock);
  g_mutex_init (&self->join_lock);
  g_mutex_init (&self->start_lock);
  g_cond_init (&self->start_cond);
  g_mutex_init (&self->timer_lock);
  g_cond_init (&self->hurry_cond);

  for (i = 0; i < self->n_groups; i++)
    g_mutex_init (&self->groups[i].lock);

  for (i = 0; i < n_workers; i++)
    {
      KdWorker *worker = &self->workers[i];

      worker->scheduler = self;
      /* Worker i goes to group i * n_groups / n_workers: contiguous runs
       * whose sizes differ by at most one. */
      worker->group = &self->groups[(guint64) i * self->n_groups / n_workers];
      worker->index = i;
      g_cond_init (&worker->cond);
    }

  if (with_timer)
    {
      self->timer = kd_timer_new ("kd-timer", error);
      if (self->timer == NULL)
        {
          g_prefix_error (error, "Could not start the timer thread: ");
          abort_start (self);
          return NULL;
        }
    }

  for (i = 0; i < n_workers; i++)
    {
      KdWorker *worker = &self->workers[i];
      char name[16];

      g_snprintf (name, sizeof name, "kd-worker-%u", i);
      kd_tsan_release (worker);
      worker->thread = g_thread_try_new (name, worker_main, worker, error);
      if (worker->thread == NULL)
        {
          g_prefix_error (error, "Could not start worker thread %u of %u: ", i + 1, n_workers);
          abort_start (self);
          return NULL;
        }
    }

  if (start != NULL && !await_start (self, error))
    {
      kd_scheduler_join (self);
      kd_scheduler_free (self);
      return NULL;
    }

  return self;
}

/* Puts a chain of tasks on the input stack in one compare-and-swap: @newest
 * links through ->next down to @oldest, as the stack itself does. */
G_ALWAYS_INLINE static inline void
push_chain (KdScheduler *self,
            KdTask      *newest,
            KdTask      *oldest)
{
  KdTask *head = __atomic_load_n (&self->input, __ATOMIC_RELAXED);

  do
    oldest->next = head;
  while (!__atomic_compare_exchange_n (&self->input, &head, newest, TRUE,
                                       __ATOMIC_SEQ_CST, __ATOMIC_RELAXED));

  wake_if_useful (self);
}

/* Any thread. */
void
kd_scheduler_push (KdScheduler *self,
                   KdTask      *task)
{
  push_chain (self, task, task);
}

/* Any thread: pushes a chain of tasks that run as if pushed one by one
 * from @oldest to @newest, with one compare-and-swap and one wake-up
 * decision. The chain links newest first, as the input stack does: from
 * @newest through ->next down to @oldest. */
void
kd_scheduler_push_chain (KdScheduler *self,
                         KdTask      *newest,
                         KdTask      *oldest)
{
  push_chain (self, newest, oldest);
}

static void
push_due_task (gpointer owner,
               gpointer task)
{
  kd_scheduler_push (owner, task);
}

/* Any thread, while the owner has tasks pending (so before the shutdown):
 * makes the timer's thread if the scheduler was made without one, for an
 * owner that delays its first task later. FALSE with the thread error if
 * it cannot be made. */
gboolean
kd_scheduler_ensure_timer (KdScheduler  *self,
                           GError      **error)
{
  gboolean ok = TRUE;

  kd_mutex_lock (&self->timer_lock);
  if (self->timer == NULL)
    {
      KdTimer *timer = kd_timer_new ("kd-timer", error);

      if (timer == NULL)
        {
          g_prefix_error (error, "Could not start the timer thread: ");
          ok = FALSE;
        }
      else
        {
          if (self->hurried)
            kd_timer_hurry (timer);
          __atomic_store_n (&self->timer, timer, __ATOMIC_RELAXED);
        }
    }
  kd_mutex_unlock (&self->timer_lock);

  return ok;
}

/* Any thread: calls @func (@owner, @data) on the timer's thread once
 * g_get_monotonic_time() reached @due_time, or at once after
 * kd_scheduler_hurry() or the shutdown. FALSE (and no call) after the
 * shutdown, which only a call from the timer's thread can meet. */
gboolean
kd_scheduler_call_at (KdScheduler *self,
                      gint64       due_time,
                      KdTimerFunc  func,
                      gpointer     owner,
                      gpointer     data)
{
  KdTimer *timer;

  kd_mutex_lock (&self->timer_lock);
  timer = self->timer;
  kd_mutex_unlock (&self->timer_lock);

  /* Made with the scheduler, by an owner that delays tasks. */
  g_assert (timer != NULL);
  return kd_timer_add (timer, due_time, func, owner, data);
}

/* Any thread: pushes @task once g_get_monotonic_time() reached @due_time,
 * or at once after kd_scheduler_hurry(). The owner delays only tasks that
 * it still counts as pending, so never after the shutdown. */
void
kd_scheduler_push_at (KdScheduler *self,
                      KdTask      *task,
                      gint64       due_time)
{
  /* A task pushed at a time is still pending, so the owner has not shut
   * the scheduler down. */
  if (!kd_scheduler_call_at (self, due_time, push_due_task, self, task))
    g_assert_not_reached ();
}

/* Any thread, idempotent: every delayed task is due now, and every one
 * delayed later too. */
void
kd_scheduler_hurry (KdScheduler *self)
{
  kd_mutex_lock (&self->timer_lock);
  self->hurried = TRUE;
  g_cond_broadcast (&self->hurry_cond);
  if (self->timer != NULL)
    kd_timer_hurry (self->timer);
  kd_mutex_unlock (&self->timer_lock);
}

/* On a worker: sleeps until g_get_monotonic_time() reached @due_time, or
 * until kd_scheduler_hurry(). */
void
kd_scheduler_sleep_until (KdScheduler *self,
                          gint64       due_time)
{
  kd_mutex_lock (&self->timer_lock);
  while (!self->hurried && g_get_monotonic_time () < due_time)
    kd_cond_wait_until (&self->hurry_cond, &self->timer_lock, due_time);
  kd_mutex_unlock (&self->timer_lock);
}

/* Any thread, idempotent: workers exit once they find no task. */
void
kd_scheduler_shutdown (KdScheduler *self)
{
  g_atomic_int_set (&self->shutting_down, TRUE);

  /* No task is pending any more: what is left in the timer is the owner's
   * other calls (idle key states), which go now. */
  kd_mutex_lock (&self->timer_lock);
  self->hurried = TRUE;
  g_cond_broadcast (&self->hurry_cond);
  if (self->timer != NULL)
    {
      kd_timer_hurry (self->timer);
      kd_timer_stop (self->timer);
    }
  kd_mutex_unlock (&self->timer_lock);

  kd_mutex_lock (&self->idle_lock);
  while (self->idle != NULL)
    {
      KdWorker *worker = self->idle;

      self->idle = worker->next_idle;
      g_atomic_int_add (&self->n_idle, -1);
      g_atomic_int_add (&self->n_spinning, 1);
      worker->woken = TRUE;
      g_cond_signal (&worker->cond);
    }
  kd_mutex_unlock (&self->idle_lock);
}

/* Waits until every worker exited; after kd_scheduler_shutdown(), from any
 * thread but a running worker. Idempotent. A worker (or the timer's
 * thread) that finishes its owner's shutdown as it exits (see
 * kd-shutdown.c) joins the others and lets its own thread go. */
void
kd_scheduler_join (KdScheduler *self)
{
  guint i;

  g_assert (kd_worker_get_current () == NULL ||
            kd_worker_get_current ()->scheduler != self);

  kd_mutex_lock (&self->join_lock);
  if (!self->joined)
    {
      KdTimer *timer;

      for (i = 0; i < self->n_workers; i++)
        {
          GThread *thread = g_steal_pointer (&self->workers[i].thread);

          if (thread == NULL)
            continue;   /* never made: the start failed */
          if (thread == g_thread_self ())
            {
              g_thread_unref (thread);
              continue;
            }
          g_thread_join (thread);
          kd_tsan_acquire (&self->workers[i]);
        }

      /* Stopped by the shutdown: once its thread exited, its calls were
       * all made (one of them, the idle keys' sweep, may still try to add
       * a call meanwhile: the timer tells it that it stopped). Only then
       * taken out, under its lock, so that a late hurry or shutdown from
       * another thread finds no timer rather than a freed one; atomically,
       * for kd_scheduler_runs_here(), which reads it without the lock. */
      if (self->timer != NULL)
        kd_timer_join (self->timer);
      kd_mutex_lock (&self->timer_lock);
      timer = __atomic_exchange_n (&self->timer, NULL, __ATOMIC_RELAXED);
      kd_mutex_unlock (&self->timer_lock);
      if (timer != NULL)
        kd_timer_free (timer);
      self->joined = TRUE;
    }
  kd_mutex_unlock (&self->join_lock);
}

/* After kd_scheduler_join(). */
void
kd_scheduler_free (KdScheduler *self)
{
  guint i;

  g_assert (self->joined);
  g_assert (self->input == NULL);

  for (i = 0; i < self->n_groups; i++)
    {
      g_assert (self->groups[i].tasks.length == 0);
      g_mutex_clear (&self->groups[i].lock);
    }
  for (i = 0; i < self->n_workers; i++)
    g_cond_clear (&self->workers[i].cond);

  g_mutex_clear (&self->idle_lock);
  g_mutex_clear (&self->join_lock);
  g_mutex_clear (&self->start_lock);
  g_cond_clear (&self->start_cond);
  g_mutex_clear (&self->timer_lock);
  g_cond_clear (&self->hurry_cond);
  g_aligned_free (self->groups);
  g_free (self->workers);
  g_free (self);
}

/* Whether the calling thread is one of @self's: a worker or its timer's. */
gboolean
kd_scheduler_runs_here (KdScheduler *self)
{
  /* The timer is only compared with the one running here, never touched:
   * if it is that one, it is alive. */
  KdTimer *timer = __atomic_load_n (&self->timer, __ATOMIC_RELAXED);

  return (current_worker != NULL && current_worker->scheduler == self) ||
         (timer != NULL && kd_timer_runs_here (timer));
}

/* The worker running on this thread, or NULL. */
KdWorker *
kd_worker_get_current (void)
{
  return current_worker;
}

KdScheduler *
kd_worker_get_scheduler (KdWorker *worker)
{
  return worker->scheduler;
}

guint
kd_worker_get_index (KdWorker *worker)
{
  return worker->index;
}

/* What the start hook set with kd_worker_set_data(); the worker's own. */
gpointer
kd_worker_get_data (KdWorker *worker)
{
  return worker->data;
}

/* From the start hook, on @worker's thread. */
void
kd_worker_set_data (KdWorker *worker,
                    gpointer  data)
{
  worker->data = data;
}
