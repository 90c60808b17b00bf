/* kd-scheduler.c: the bounded set of worker threads and the 2-tier fan-out
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * DESIGN
 *
 * The scheduler runs tasks (KdTask: an unkeyed job, or a keyed mailbox that
 * is ready) on a bounded set of worker threads. It knows nothing about jobs
 * or keys: its owner gives it a function that runs one task.
 *
 * Tier 1 is the input queue: every task pushed from outside the workers
 * enters it. Tier 2 is the worker groups (as many as the dispatcher's
 * fan-out, kd_dispatcher_set_fanout()): each group has its own queue
 * feeding its own workers. The input queue is a lock-free stack: a
 * producer pushes with one compare-and-swap and never waits for a worker
 * (a batch pushes its whole chain of tasks with one). A worker whose group
 * queue is empty feeds its group from the input: it takes the whole stack
 * with one atomic exchange, puts it back in arrival order, runs the first
 * task and leaves the rest in its group queue for its group mates. Nobody pops single tasks off the
 * shared stack, so there is no ABA hazard, and the input's cache line moves
 * once per batch rather than once per task. A worker that finds its group
 * queue empty steals half of another group's queue before it looks at the
 * input, whose tasks are newer: no task waits behind a busy group while
 * another group's worker is idle, however much fresh input arrives.
 *
 * Beside the input, tier 1 has a ring of values (KdRing, kd-ring-private.h,
 * as many slots as the owner asks for, rounded up to a power of two, at
 * most VALUES_MAX): the owner pushes a value and a tag there instead of a
 * task (kd_scheduler_push_value(), FALSE when the ring is full), and the
 * worker that pops it makes it a task with the owner's
 * value_task function, on its own thread. The dispatcher sends its plain
 * unkeyed jobs this way, as their items: a task record written by the
 * producer and read by a worker on another processor cost a cache miss per
 * job, and the stack's compare-and-swap fought the workers' exchange,
 * while the ring's values are four to a cache line, and pushers and
 * poppers each have a line of their own. Workers pop the ring one value
 * at a time, so no value waits behind a busy worker; they have no group
 * queue to pass through. Every other look for a task takes a value first,
 * and the others look at the group queues, the other groups and the input
 * first, so that values and tasks take turns and neither starves the
 * other. A value counts as visible once its slot is filled, not when its
 * position is claimed (kd_ring_has_ready()), so a worker never spins on
 * a pusher preempted between the two: it parks, and the fill wakes it.
 *
 * Priority classes (KdBand, from a task's band): the input, the group
 * queues and the ring of values hold the default class. The high and idle
 * classes have a locked queue each (@high, @low), and @attention counts
 * their tasks: a worker reads it on every look for a task and, while it is
 * zero, looks only as above. Otherwise it takes from the highest class
 * with a task, but every FAIR_EVERY-th such take looks at the classes in
 * turn, one class further each time, so that each class with work gets at
 * least one task in every FAIR_EVERY * 3 a worker takes
 * (find_task_by_class()). A mailbox carries the class of the job that
 * made it ready (kd-key-table.c), and keeps it until it is reaped.
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
 * consistent atomics: a pusher publishes its task (the input stack, the
 * fill of the ring's oldest slot, or a group's n_tasks) and then reads
 * n_spinning and n_idle; a worker going to sleep publishes itself (n_idle)
 * and drops n_spinning, and then looks at the queues again. At least one
 * of the two sees the other.
 *
 * Start and stop hooks: with a start hook, each worker runs it on its own
 * thread before it takes any task, and kd_scheduler_new() waits at a start
 * barrier for all of them; if one fails, all exit and kd_scheduler_new()
 * fails with its error. A worker runs the stop hook as it exits.
 *
 * The set of threads changes at run time. Workers live in slots (KdSlots:
 * never moved, so other threads read them without a lock); n_target is how
 * many should run (n-workers), n_threads how many slots run one, n_ready
 * how many of those passed their start hook. kd_scheduler_resize() raises
 * n_target and starts a thread in each vacant slot from the old count to
 * the new one, waiting for their start hooks (vacant slots below the old
 * count start on demand); or lowers it, and each worker at or above it exits
 * after the task it runs (over_target()). With an idle time
 * (kd_scheduler_set_idle_exit()) a parked worker sleeps with a deadline
 * and exits when it passes unwoken. A pusher that finds no parked worker
 * and fewer threads than n_target starts one in the lowest vacant slot
 * (start_on_demand()), in the pusher's thread, without waiting for its
 * start hook. The common path pays one bit test for each: a worker reads
 * @attention on every look for a task anyway (the priority classes, below),
 * and SHRINKING there says a worker runs above n_target; a pusher reads
 * @n_idle anyway, and IDLE_WANTED there says fewer threads run than
 * n_target (update_wanted_locked() keeps both, under spawn_lock). Three
 * rules keep this safe:
 *
 *  - The last ready worker never exits early (retire()): with at least one
 *    ready worker, every visible task is taken by the usual wake-up
 *    protocol, so an accepted task never depends on a thread that cannot
 *    be made, and a failed start costs parallelism only.
 *  - A slot has one thread at a time: a thread started in a slot joins the
 *    slot's previous thread before its start hook, so the owner's
 *    per-worker state (indexed by slot) never has two owners. So that this
 *    join never closes a cycle, a thread that leaves early (retired, or
 *    its late start hook failed) never finishes a shutdown itself, which
 *    would join the slot's next thread: shutdowns begun on it go to a
 *    thread of their own (kd_shutdown_thread_leave(); a late worker
 *    enters only once its start hook succeeded), and the owner refuses a
 *    resize from its start and stop hooks.
 *  - A failed late start (no thread, or its start hook) stops the starts
 *    on demand until the next resize (@starts_failed), so that pushes do
 *    not try again and again, and leaves the workers that run alone.
 *  - A worker left above n_target as the only thread (a shrink after
 *    idle exits) starts one below n_target (replace_self(); it does not
 *    park while it should), and once that one is ready the parked
 *    workers are woken, so the one above retires.
 *
 * A late worker's start hook that drops the owner's last reference leaves
 * the shutdown to a thread of its own (kd-shutdown.c; a critical if none
 * can be made).
 *  - Nothing starts after the shutdown (checked under spawn_lock, where it
 *    is set), and kd_scheduler_join() joins each slot's last thread, which
 *    joined the ones before. The other classes' counts in @attention
 *    change under their queue's lock with the queue, so they never go
 *    below zero into the SHRINKING bit.
 *
 * A worker that shutdowns were left to (kd-shutdown.c) before it would
 * retire does not exit early: it finishes them as it exits at the
 * shutdown.
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
 * spawn_lock the slots' threads and counts, start_lock the start barrier
 * and late starts' results, timer_lock the timer and the hurry flag,
 * join_lock the join. A thread holds at most one of a group lock,
 * idle_lock and spawn_lock at a time, but start_lock may be taken under
 * spawn_lock; the timer's own lock is taken under timer_lock, and
 * timer_lock (and spawn_lock, briefly) under join_lock, which is held
 * while the threads are joined.
 */

#include "config.h"

#include "kd-ring-private.h"
#include "kd-scheduler-private.h"
#include "kd-shutdown-private.h"
#include "kd-slots-private.h"
#include "kd-sync-private.h"
#include "kd-timer-private.h"

/* How long the spinning worker looks for a task, yielding the processor in
 * between, before it parks: long enough to catch the next burst of a
 * producer that submits in bursts, so most jobs start without waiting for
 * a wake-up (kd-bench L1: median start latency 23-30 us -> 11-12 us, no
 * throughput cost). One worker spins at a time, unless it stalled (see
 * STALL_US). */
#define SPIN_US 60

/* The most slots the ring of values has: at 16 bytes each, 256 KiB. */
#define VALUES_MAX 16384

/* How long a spinner may go without a pass before pushers stop counting on
 * it: a pass takes a microsecond or two when its thread runs. */
#define STALL_US 20

/* How often a worker's take looks at the priority classes in turn rather
 * than highest first (see find_task_by_class()). */
#define FAIR_EVERY 8

/* In @attention: a worker runs above n_target, and should go (a shrink). */
#define SHRINKING (1 << 30)

/* In @n_idle: fewer threads run than n_target (idle ones exited), so a
 * pusher that finds no parked worker may start one. One load tells a
 * pusher whether to look further for either reason. */
#define IDLE_WANTED (1 << 20)

static inline gint
idle_count (gint n_idle)
{
  return n_idle & (IDLE_WANTED - 1);
}

typedef struct
{
  GMutex     lock;
  KdTaskList tasks;    /* protected by @lock */
  gint       n_tasks;  /* atomic copy of tasks.length, read without the lock */
} __attribute__ ((aligned (64))) KdTaskQueue;   /* a cache line each: queues do not share one */

/* A worker slot's state, under spawn_lock: a thread runs in it (RUNNING),
 * or none does, or one is on its way out (VACANT). A thread started in a
 * slot first joins the slot's previous thread, so that one index never
 * has two threads (two worker inits) at once. */
enum
{
  SLOT_VACANT,
  SLOT_RUNNING,
};

struct _KdWorker
{
  /* Immutable once the slot is made */
  KdScheduler *scheduler;
  KdTaskQueue *group;
  guint        index;

  /* Protected by scheduler->spawn_lock */
  GThread     *thread;      /* the slot's last thread, until joined */
  GThread     *previous;    /* the one before, for @thread to join first */
  gint         state;
  gboolean     late;        /* started after kd_scheduler_new() returned */

  /* Its thread's own */
  gpointer     data;        /* set by the start hook, on the worker's thread */
  guint        takes;       /* tasks taken while other classes had some */
  guint        fair_band;   /* the class its last fair take looked at first */
  gboolean     values_first; /* its last look took from the values before the queues */

  /* Protected by scheduler->start_lock: a late start's outcome, for the
   * resize that waits for it (@awaited) */
  gboolean     awaited;
  gint         start_result;
  GError      *start_error;

  /* Protected by scheduler->idle_lock */
  GCond        cond;
  KdWorker    *next_idle;
  gboolean     woken;
} __attribute__ ((aligned (64)));

struct _KdScheduler
{
  /* Immutable */
  KdTaskFunc  func;
  KdValueTaskFunc value_task;
  KdWorkerStartFunc start;
  KdWorkerStopFunc  stop;
  gpointer    user_data;
  guint       n_initial;   /* the workers kd_scheduler_new() started */
  guint       n_groups;
  guint       n_processors;
  KdTaskQueue    *groups;
  /* The other classes' queues (KdBand): after the groups, in their array */
  KdTaskQueue    *high;
  KdTaskQueue    *low;

  /* Worker slots (KdWorker), made by kd_scheduler_new() and resizes under
   * @spawn_lock, never moved */
  KdSlots     workers;

  /* Tier 1: atomic, a stack of tasks linked through task->next, newest first */
  KdTask     *input;

  /* Tier 1 for values: a worker takes them one by one and makes each a
   * task with @value_task */
  KdRing      values;

  /* Atomic, read on every look for a task: the tasks in @high and @low,
   * plus SHRINKING while a worker runs in a slot at or above n_target */
  gint        attention;

  /* Idle workers */
  GMutex      idle_lock;
  KdWorker   *idle;        /* stack of parked workers, protected by @idle_lock */
  gint        n_idle;      /* atomic: workers on the stack (idle_count()), plus
                            * IDLE_WANTED while fewer threads run than n_target */
  gint        n_spinning;  /* atomic: workers awake and looking for a task */
  gint64      spin_stamp;  /* atomic: when a spinner last ran, or was woken */
  gint        shutting_down; /* atomic; set under @spawn_lock */

  /* The set of threads, written under @spawn_lock, read atomically:
   * how many should run (n-workers), how many slots run a thread (some
   * maybe still in their start hook), how many of those are ready (their
   * start hook returned TRUE), and when an idle one exits: after
   * @idle_exit_us parked (0: never), while more than @min_ready are ready */
  GMutex      spawn_lock;
  gint        n_target;
  gint        n_threads;
  gboolean    wanted;       /* IDLE_WANTED is in n_idle */
  gint        starts_failed; /* atomic, set under @spawn_lock: a late start failed,
                              * none on demand until a resize */
  gint        n_ready;
  gint64      idle_exit_us;
  gint        min_ready;

  /* The start barrier (with start hooks only), protected by @start_lock:
   * workers that ran their start hook, the first failure, and whether they
   * may go on (START_GO) or must stop (START_ABORT); late starts report
   * here too */
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

static void start_on_demand (KdScheduler *self);
static void replace_self (KdScheduler *self);
static void wake_all_parked (KdScheduler *self);

static inline KdWorker *
worker_at (KdScheduler *self,
           guint        index)
{
  return KD_SLOTS_GET (&self->workers, index, KdWorker);
}

/* The worker running on this thread: compiler TLS, read on every submit. */
static KD_THREAD_LOCAL KdWorker *current_worker;

static gboolean
work_visible (KdScheduler *self)
{
  guint i;

  if (__atomic_load_n (&self->input, __ATOMIC_SEQ_CST) != NULL || kd_ring_has_ready (&self->values))
    return TRUE;
  for (i = 0; i < self->n_groups; i++)
    if (g_atomic_int_get (&self->groups[i].n_tasks) > 0)
      return TRUE;
  /* The other classes' tasks, last: the default class is the common one. */
  return (g_atomic_int_get (&self->attention) & ~SHRINKING) > 0;
}

/* Whether the workers counted as spinning have not run for STALL_US while
 * a processor may be free for one more: fewer workers are awake than there
 * are processors. (With as many awake, another one would only take turns
 * with them, and a wake-up every STALL_US costs a throughput workload half
 * its speed: kd-bench W2 fell from 9.3 to 1.7-2.5 M/s in some runs.) */
static gboolean
spinners_stalled (KdScheduler *self)
{
  return g_atomic_int_get (&self->n_threads) - idle_count (g_atomic_int_get (&self->n_idle)) <
           (gint) self->n_processors &&
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

      if (idle_count (g_atomic_int_get (&self->n_idle)) == 0 ||
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

/* The halves of wake_if_useful() that look further, out of line. A
 * running spinner will find the work: then the queues are not read. */
__attribute__ ((noinline)) static void
wake_for_work (KdScheduler *self)
{
  if (g_atomic_int_get (&self->n_spinning) > 0 && !spinners_stalled (self))
    return;
  if (work_visible (self))
    wake_one (self);
}

__attribute__ ((noinline)) static void
start_for_work (KdScheduler *self)
{
  if (work_visible (self))
    start_on_demand (self);
}

/* After making work visible: wakes a parked worker for it, or, with none
 * parked and fewer threads than n-workers (idle ones exited), starts one.
 * One load when neither is the case, which is every push and every take
 * of a busy dispatcher. */
static inline void
wake_if_useful (KdScheduler *self)
{
  gint n_idle = g_atomic_int_get (&self->n_idle);

  if (G_LIKELY (n_idle == 0))
    return;
  if (idle_count (n_idle) > 0)
    wake_for_work (self);
  else
    start_for_work (self);
}

/* With @spawn_lock held, after a slot's state, n_target or starts_failed
 * changed: whether a pusher may start a thread (IDLE_WANTED: fewer slots
 * below n_target run than n_target, so a worker left above it after a
 * shrink is replaced, and then retires), and whether a worker runs above
 * n_target (SHRINKING). The scan is over the slots, on these rare paths. */
static void
update_wanted_locked (KdScheduler *self)
{
  guint target = (guint) g_atomic_int_get (&self->n_target);
  guint running_below = 0, i;
  gboolean shrinking = FALSE, wanted;

  for (i = 0; i < kd_slots_length (&self->workers); i++)
    if (worker_at (self, i)->state == SLOT_RUNNING)
      {
        if (i < target)
          running_below++;
        else
          shrinking = TRUE;
      }

  wanted = !g_atomic_int_get (&self->starts_failed) && running_below < target;
  if (wanted != self->wanted)
    {
      self->wanted = wanted;
      g_atomic_int_add (&self->n_idle, wanted ? IDLE_WANTED : -IDLE_WANTED);
    }
  if (shrinking)
    g_atomic_int_or ((guint *) &self->attention, SHRINKING);
  else
    g_atomic_int_and ((guint *) &self->attention, ~(guint) SHRINKING);
}

static KdTask *
group_pop (KdTaskQueue *group)
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
keep_first (KdTaskQueue *group,
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
             KdTaskQueue     *group)
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
      KdTaskQueue *victim = &self->groups[(own + i) % self->n_groups];
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

/* The oldest value of the ring, as a task. */
static KdTask *
pop_value (KdScheduler *self,
           KdWorker    *worker)
{
  gpointer value;
  guint32 tag;

  if (!kd_ring_pop (&self->values, &value, &tag))
    return NULL;
  return self->value_task (value, tag, worker, self->user_data);
}

/* A task of the default class: from the ring of values, the worker's
 * group, another group or the input. */
static KdTask *
find_default_task (KdWorker *worker)
{
  KdScheduler *self = worker->scheduler;
  KdTask *task;

  /* Every other look takes a value first: values and tasks take turns,
   * so neither starves the other (an input batch fills the group queue,
   * which the other looks drain). */
  worker->values_first = !worker->values_first;
  if (worker->values_first && (task = pop_value (self, worker)) != NULL)
    return task;
  if ((task = group_pop (worker->group)) != NULL)
    return task;
  /* Other groups' queues hold tasks older than anything in the input: look
   * there first, or a task left behind a busy group's long job would wait
   * for as long as fresh input keeps coming. */
  if ((task = steal (self, worker)) != NULL)
    return task;
  if ((task = fetch_input (self, worker->group)) != NULL)
    return task;
  return pop_value (self, worker);
}

/* The oldest task of class @band. */
static KdTask *
take_class (KdWorker *worker,
            KdBand    band)
{
  KdScheduler *self = worker->scheduler;
  KdTaskQueue *queue;
  KdTask *task, *last;
  guint n;

  if (band == KD_BAND_DEFAULT)
    return find_default_task (worker);

  queue = band == KD_BAND_HIGH ? self->high : self->low;
  if (g_atomic_int_get (&queue->n_tasks) == 0)
    return NULL;
  kd_mutex_lock (&queue->lock);
  task = kd_task_list_take (&queue->tasks, 1, &n, &last);
  if (n > 0)
    {
      g_atomic_int_add (&queue->n_tasks, -1);
      g_atomic_int_add (&self->attention, -1);
    }
  kd_mutex_unlock (&queue->lock);
  return task;
}

/* Tasks of another class than the default wait: the highest class with a
 * task goes first. But every FAIR_EVERY-th task a worker takes this way,
 * it looks at the classes in turn, starting one class further than at its
 * last such take: in every FAIR_EVERY * 3 tasks it takes, each class with
 * a task ready gets at least one, so no class starves. */
static KdTask *
find_task_by_class (KdWorker *worker)
{
  static const KdBand by_priority[] = { KD_BAND_HIGH, KD_BAND_DEFAULT, KD_BAND_LOW };
  gboolean fair = (worker->takes + 1) % FAIR_EVERY == 0;
  guint first = fair ? (worker->fair_band + 1) % G_N_ELEMENTS (by_priority) : 0;
  KdTask *task = NULL;
  guint i;

  for (i = 0; i < G_N_ELEMENTS (by_priority) && task == NULL; i++)
    task = take_class (worker, by_priority[(first + i) % G_N_ELEMENTS (by_priority)]);
  if (task != NULL)
    {
      worker->takes++;
      if (fair)
        worker->fair_band = first;
    }
  return task;
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
      if ((task = g_atomic_int_get (&self->attention) == 0 ? find_default_task (worker)
                                                             : find_task_by_class (worker)) != NULL)
        return task;
    }
  while ((now = g_get_monotonic_time ()) < until);

  return NULL;
}

/* With SHRINKING set: the slot is above n-workers and another worker is
 * ready to go on. */
static gboolean
over_target (KdScheduler *self,
             KdWorker    *worker)
{
  return (gint) worker->index >= g_atomic_int_get (&self->n_target) &&
         g_atomic_int_get (&self->n_ready) > 1;
}

/* With SHRINKING set: the slot is above n-workers and its thread is the
 * only one, so it must have one started below n-workers before it can go
 * (replace_self()); unless starts failed. */
static gboolean
must_replace_self (KdScheduler *self,
                   KdWorker    *worker)
{
  return (gint) worker->index >= g_atomic_int_get (&self->n_target) &&
         g_atomic_int_get (&self->n_threads) == 1 &&
         !g_atomic_int_get (&self->starts_failed);
}

/* Whether an idle worker may exit now: more workers are ready than the
 * minimum kept. */
static gboolean
may_exit_idle (KdScheduler *self)
{
  return __atomic_load_n (&self->idle_exit_us, __ATOMIC_RELAXED) > 0 &&
         g_atomic_int_get (&self->n_ready) > g_atomic_int_get (&self->min_ready);
}

/* Sleeps until woken. On return *spinning says whether the waker counted
 * this worker as spinning; *expired, that it slept its idle time out
 * unwoken (it is off the idle stack then, and may exit). */
static void
park (KdWorker *worker,
      gboolean *spinning,
      gboolean *expired)
{
  KdScheduler *self = worker->scheduler;
  gboolean leave = FALSE;

  *expired = FALSE;
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
      (work_visible (self) || g_atomic_int_get (&self->shutting_down) ||
       ((g_atomic_int_get (&self->attention) & SHRINKING) &&
        (over_target (self, worker) || must_replace_self (self, worker)))))
    {
      /* A task arrived (or shutdown began, or another worker became ready
       * while this one is above n_target: it retires) while we were
       * announcing ourselves: look again. A worker that becomes ready
       * counts itself before it wakes the parked ones, so one of the two
       * sees the other. */
      leave = TRUE;
    }
  else
    {
      gint64 until = may_exit_idle (self)
                     ? g_get_monotonic_time () + __atomic_load_n (&self->idle_exit_us, __ATOMIC_RELAXED)
                     : -1;

      while (!worker->woken)
        {
          if (until < 0)
            kd_cond_wait (&worker->cond, &self->idle_lock);
          else if (!kd_cond_wait_until (&worker->cond, &self->idle_lock, until) &&
                   !worker->woken && g_get_monotonic_time () >= until)
            {
              leave = *expired = TRUE;
              break;
            }
        }
      if (!leave)
        *spinning = TRUE;
    }

  if (leave)
    {
      /* Not woken: take ourselves off the stack. */
      KdWorker **link = &self->idle;

      while (*link != worker)
        link = &(*link)->next_idle;
      *link = worker->next_idle;
      g_atomic_int_add (&self->n_idle, -1);
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

/* A worker started after kd_scheduler_new() runs the start hook with
 * nobody waiting at a barrier. If it fails, the worker gives its slot back
 * and the scheduler keeps the threads it has, starting none on demand
 * until the next resize, so that no later start tries again in vain. The
 * resize that started it gets the error; a start on demand has nobody to
 * tell, and says it in a warning. FALSE if the worker must exit. */
static gboolean
start_late_worker (KdWorker *worker)
{
  KdScheduler *self = worker->scheduler;
  GError *error = NULL;
  gboolean started = self->start == NULL || self->start (worker, self->user_data, &error);
  gboolean wake_all = FALSE;

  /* The slot's state and the report in one step: a resize that reuses the
   * slot once it is vacant waits for its own thread's report, not this
   * one's. */
  kd_mutex_lock (&self->spawn_lock);
  kd_mutex_lock (&self->start_lock);
  if (started)
    {
      g_atomic_int_inc (&self->n_ready);
      /* A worker left above n_target by a shrink may retire now: parked as
       * the last ready one, it sleeps without a deadline. */
      if (g_atomic_int_get (&self->attention) & SHRINKING)
        wake_all = TRUE;
    }
  else
    {
      worker->state = SLOT_VACANT;
      g_atomic_int_add (&self->n_threads, -1);
      g_atomic_int_set (&self->starts_failed, TRUE);
      update_wanted_locked (self);
    }
  /* Awaited and not reported yet: this thread is the one the resize
   * started (a thread started later in the slot reports to nobody). */
  if (worker->awaited && worker->start_result == START_PENDING)
    {
      worker->start_result = started ? START_GO : START_ABORT;
      worker->start_error = g_steal_pointer (&error);
      g_cond_broadcast (&self->start_cond);
    }
  kd_mutex_unlock (&self->start_lock);
  kd_mutex_unlock (&self->spawn_lock);

  if (wake_all)
    wake_all_parked (self);
  if (error != NULL)
    g_warning ("A kdispatch worker started on demand could not start: no more start "
               "on demand until the next resize, and %d workers run: %s",
               g_atomic_int_get (&self->n_threads), error->message);
  g_clear_error (&error);

  /* Only now may shutdowns be left to this thread: one left while its
   * start hook ran, had it failed, would make it join the slot's next
   * thread, which joins it first. */
  if (started)
    kd_shutdown_thread_enter ();
  return started;
}

/* Whether @worker should exit early: its slot is above n-workers, or
 * (@idle) it slept its idle time out. The last ready worker never does,
 * nor one that shutdowns were left to (kd-shutdown.c), nor any once the
 * scheduler shuts down (they exit then anyway). If it does, its slot is
 * vacant at once: a thread started there joins this one first. */
static gboolean
retire (KdScheduler *self,
        KdWorker    *worker,
        gboolean     idle)
{
  gboolean retiring = FALSE;

  if (kd_shutdown_thread_has_finishes ())
    return FALSE;

  kd_mutex_lock (&self->spawn_lock);
  if (!g_atomic_int_get (&self->shutting_down))
    {
      gint ready = g_atomic_int_get (&self->n_ready);

      if ((gint) worker->index >= g_atomic_int_get (&self->n_target)
          ? ready > 1
          : idle && ready > g_atomic_int_get (&self->min_ready))
        {
          worker->state = SLOT_VACANT;
          g_atomic_int_add (&self->n_ready, -1);
          g_atomic_int_add (&self->n_threads, -1);
          update_wanted_locked (self);
          retiring = TRUE;
        }
    }
  kd_mutex_unlock (&self->spawn_lock);

  /* From now on a shutdown begun on this thread goes to a thread of its
   * own (kd-shutdown.c): this one would join the slot's next thread,
   * which joins it first. */
  if (retiring)
    kd_shutdown_thread_leave ();

  return retiring;
}


static gpointer
worker_main (gpointer data)
{
  KdWorker *worker = data;
  KdScheduler *self = worker->scheduler;
  gboolean spinning = FALSE, retired = FALSE;

  kd_tsan_acquire (worker);
  /* The slot's previous thread is gone before this one starts. */
  if (worker->previous != NULL)
    g_thread_join (g_steal_pointer (&worker->previous));
  current_worker = worker;
  if (!worker->late)
    kd_shutdown_thread_enter ();

  if (worker->late ? !start_late_worker (worker)
                   : self->start != NULL && !start_worker (worker))
    {
      current_worker = NULL;
      kd_tsan_release (worker);
      kd_shutdown_thread_exit ();
      return NULL;
    }

  for (;;)
    {
      gint attention = g_atomic_int_get (&self->attention);
      KdTask *task;

      if (G_LIKELY (attention == 0))
        {
          task = find_default_task (worker);
        }
      else
        {
          /* A shrink: the worker finished its task (a key's batch) first.
           * The last ready worker, above n_target, first has one started
           * below it (it may be the only one that runs, and busy). */
          if (attention & SHRINKING)
            {
              if (over_target (self, worker))
                {
                  if ((retired = retire (self, worker, FALSE)))
                    break;
                }
              else if (must_replace_self (self, worker))
                {
                  replace_self (self);
                }
            }
          task = find_task_by_class (worker);
        }
      if (task == NULL && !spinning &&
          g_atomic_int_compare_and_exchange (&self->n_spinning, 0, 1))
        spinning = TRUE;

      if (task == NULL && spinning)
        task = spin_for_task (worker);

      if (task == NULL)
        {
          gboolean expired;

          if (g_atomic_int_get (&self->shutting_down))
            break;
          park (worker, &spinning, &expired);
          if (expired && (retired = retire (self, worker, TRUE)))
            break;
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

  /* Once it no longer counts as spinning: others take what it leaves in
   * its group, and the task it may have been woken for. */
  if (retired)
    wake_if_useful (self);

  if (self->stop != NULL)
    self->stop (worker, self->user_data);

  current_worker = NULL;
  kd_tsan_release (worker);
  if (!retired)
    {
      g_atomic_int_add (&self->n_ready, -1);
      g_atomic_int_add (&self->n_threads, -1);
    }

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
  while (self->n_started < self->n_initial)
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

/* Makes worker slots up to @n_slots (under @spawn_lock, or before any
 * thread runs). The first kd_scheduler_new() made go to group
 * i * n_groups / n_initial, contiguous runs whose sizes differ by at most
 * one; later ones take the groups in turn. */
static void
add_slots (KdScheduler *self,
           guint        n_slots)
{
  guint i;

  for (i = kd_slots_length (&self->workers), kd_slots_grow (&self->workers, n_slots);
       i < n_slots; i++)
    {
      KdWorker *worker = worker_at (self, i);

      worker->scheduler = self;
      worker->group = &self->groups[i < self->n_initial
                                    ? (guint64) i * self->n_groups / self->n_initial
                                    : i % self->n_groups];
      worker->index = i;
      g_cond_init (&worker->cond);
    }
}

/* With @spawn_lock held: starts a thread in a vacant slot, counted in
 * n_threads (a @late one counts as ready once its start hook returned).
 * The slot's last thread, if any, is on its way out: the new one joins it
 * first. FALSE with the thread error if no thread can be made. */
static gboolean
spawn_locked (KdScheduler  *self,
              KdWorker     *worker,
              gboolean      late,
              GError      **error)
{
  char name[16];

  g_assert (worker->state == SLOT_VACANT && worker->previous == NULL);
  worker->previous = g_steal_pointer (&worker->thread);
  worker->late = late;
  worker->state = SLOT_RUNNING;
  if (late)
    {
      g_atomic_int_inc (&self->n_threads);
      update_wanted_locked (self);
    }
  g_snprintf (name, sizeof name, "kd-worker-%u", worker->index);
  kd_tsan_release (worker);
  worker->thread = g_thread_try_new (name, worker_main, worker, error);
  if (worker->thread != NULL)
    return TRUE;

  worker->state = SLOT_VACANT;
  worker->thread = g_steal_pointer (&worker->previous);
  if (late)
    {
      g_atomic_int_add (&self->n_threads, -1);
      update_wanted_locked (self);
    }
  return FALSE;
}

/* With @spawn_lock held: the lowest vacant slot below n-workers, or NULL. */
static KdWorker *
vacant_slot_locked (KdScheduler *self)
{
  guint i, n = (guint) g_atomic_int_get (&self->n_target);

  for (i = 0; i < n; i++)
    if (worker_at (self, i)->state == SLOT_VACANT)
      return worker_at (self, i);
  return NULL;
}

/* Starts a thread in the lowest vacant slot below n_target if one is
 * wanted (IDLE_WANTED). A thread that cannot be made costs only
 * parallelism: at least one ready worker always runs (see retire());
 * later pushes do not try again until a resize (@starts_failed). */
static void
start_wanted (KdScheduler *self)
{
  GError *error = NULL;
  gint n_threads = 0;

  kd_mutex_lock (&self->spawn_lock);
  if (!g_atomic_int_get (&self->shutting_down) && self->wanted)
    {
      KdWorker *worker = vacant_slot_locked (self);

      /* No thread: pushes stop trying until a resize. */
      if (worker != NULL && !spawn_locked (self, worker, TRUE, &error))
        {
          n_threads = g_atomic_int_get (&self->n_threads);
          g_atomic_int_set (&self->starts_failed, TRUE);
          update_wanted_locked (self);
        }
    }
  kd_mutex_unlock (&self->spawn_lock);

  if (error != NULL)
    g_warning ("A kdispatch worker could not be started on demand: no more start on "
               "demand until the next resize, and %d workers run: %s", n_threads,
               error->message);
  g_clear_error (&error);
}

/* On the only thread, above n-workers after a shrink: starts one worker
 * below n-workers (one only: the rest start on demand), which wakes the
 * parked ones once it is ready, so that this one retires. */
static void
replace_self (KdScheduler *self)
{
  GError *error = NULL;

  kd_mutex_lock (&self->spawn_lock);
  if (!g_atomic_int_get (&self->shutting_down) && !g_atomic_int_get (&self->starts_failed) &&
      g_atomic_int_get (&self->n_threads) == 1)
    {
      KdWorker *worker = vacant_slot_locked (self);

      if (worker != NULL && !spawn_locked (self, worker, TRUE, &error))
        {
          g_atomic_int_set (&self->starts_failed, TRUE);
          update_wanted_locked (self);
        }
    }
  kd_mutex_unlock (&self->spawn_lock);

  if (error != NULL)
    g_warning ("A kdispatch worker could not be started below the new count: "
               "the one above it stays: %s", error->message);
  g_clear_error (&error);
}

/* A pusher found work, no parked worker and fewer threads than n-workers
 * (idle ones exited): starts one, unless a spinner will take the work. */
static void
start_on_demand (KdScheduler *self)
{
  if (g_atomic_int_get (&self->n_spinning) > 0 && !spinners_stalled (self))
    return;
  start_wanted (self);
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
 * on each worker's thread as it exits. Values may be pushed too
 * (kd_scheduler_push_value()), into a ring of at least @n_values slots, up
 * to VALUES_MAX, and @value_task makes each a task.
 */
KdScheduler *
kd_scheduler_new (guint              n_workers,
                  guint              n_groups,
                  gboolean           with_timer,
                  KdTaskFunc         func,
                  KdValueTaskFunc    value_task,
                  guint              n_values,
                  KdWorkerStartFunc  start,
                  KdWorkerStopFunc   stop,
                  gpointer           user_data,
                  GError           **error)
{
  KdScheduler *self;
  guint32 ring_size = 1;
  guint i;

  g_assert (n_workers > 0);
  g_assert (value_task != NULL);

  self = g_aligned_alloc0 (1, sizeof (KdScheduler), G_ALIGNOF (KdScheduler));
  self->func = func;
  self->value_task = value_task;
  while (ring_size < MIN (n_values, VALUES_MAX))
    ring_size <<= 1;
  kd_ring_init (&self->values, ring_size);
  self->start = start;
  self->stop = stop;
  self->user_data = user_data;
  self->n_initial = n_workers;
  self->n_groups = CLAMP (n_groups, 1, n_workers);
  self->n_processors = g_get_num_processors ();
  self->n_target = self->n_threads = self->n_ready = (gint) n_workers;
  self->min_ready = 1;
  kd_slots_init (&self->workers, sizeof (KdWorker));
  self->groups = g_aligned_alloc0 (self->n_groups + 2, sizeof (KdTaskQueue), G_ALIGNOF (KdTaskQueue));
  self->high = &self->groups[self->n_groups];
  self->low = &self->groups[self->n_groups + 1];
  g_mutex_init (&self->idle_lock);
  g_mutex_init (&self->spawn_lock);
  g_mutex_init (&self->join_lock);
  g_mutex_init (&self->start_lock);
  g_cond_init (&self->start_cond);
  g_mutex_init (&self->timer_lock);
  g_cond_init (&self->hurry_cond);

  for (i = 0; i < self->n_groups + 2; i++)
    g_mutex_init (&self->groups[i].lock);

  add_slots (self, n_workers);

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

  kd_mutex_lock (&self->spawn_lock);
  for (i = 0; i < n_workers; i++)
    if (!spawn_locked (self, worker_at (self, i), FALSE, error))
      {
        kd_mutex_unlock (&self->spawn_lock);
        g_prefix_error (error, "Could not start worker thread %u of %u: ", i + 1, n_workers);
        abort_start (self);
        return NULL;
      }
  kd_mutex_unlock (&self->spawn_lock);

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

/* A task of another class than the default: to its class's queue. Out of
 * line: the default class's push stays a compare-and-swap and two loads. */
__attribute__ ((noinline)) static void
push_band (KdScheduler *self,
           KdTask      *task)
{
  KdTaskQueue *queue = task->band == KD_BAND_HIGH ? self->high : self->low;

  /* Counted in @attention with the queue, under its lock: a pop counts
   * it out only after this. */
  kd_mutex_lock (&queue->lock);
  kd_task_list_push (&queue->tasks, task);
  g_atomic_int_inc (&queue->n_tasks);
  g_atomic_int_inc (&self->attention);
  kd_mutex_unlock (&queue->lock);

  wake_if_useful (self);
}

/* Any thread: @task waits for a worker among the tasks of its class
 * (task->band). */
void
kd_scheduler_push (KdScheduler *self,
                   KdTask      *task)
{
  if (G_UNLIKELY (task->band != KD_BAND_DEFAULT))
    push_band (self, task);
  else
    push_chain (self, task, task);
}

/* Any thread: @value waits in the ring of values, for a worker to make it
 * a task (the value_task function), with @tag; FALSE if the ring is full. */
gboolean
kd_scheduler_push_value (KdScheduler *self,
                         gpointer     value,
                         guint32      tag)
{
  if (!kd_ring_push (&self->values, value, tag))
    return FALSE;
  wake_if_useful (self);
  return TRUE;
}

/* Any thread: kd_scheduler_push_value() for each of @values, as many as
 * the ring has room for (returned), with one compare-and-swap and one
 * wake-up decision. */
guint
kd_scheduler_push_values (KdScheduler    *self,
                          gpointer const *values,
                          guint           n_values,
                          guint32         tag)
{
  guint n = kd_ring_push_many (&self->values, values, n_values, tag);

  if (n > 0)
    wake_if_useful (self);
  return n;
}

/* Any thread: pushes a chain of tasks that run as if pushed one by one
 * from @oldest to @newest, with one compare-and-swap and one wake-up
 * decision. The chain links newest first, as the input stack does: from
 * @newest through ->next down to @oldest. Its tasks are of the default
 * class. */
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

/* Wakes every parked worker (each counts as spinning until it finds a
 * task or parks again). */
static void
wake_all_parked (KdScheduler *self)
{
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

/* Any thread, idempotent: workers exit once they find no task. */
void
kd_scheduler_shutdown (KdScheduler *self)
{
  /* Under @spawn_lock: no thread starts from now on. */
  kd_mutex_lock (&self->spawn_lock);
  g_atomic_int_set (&self->shutting_down, TRUE);
  kd_mutex_unlock (&self->spawn_lock);

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

  wake_all_parked (self);
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

      /* No slot is made or started any more: the shutdown came first. */
      for (i = 0; i < kd_slots_length (&self->workers); i++)
        {
          KdWorker *worker = worker_at (self, i);
          GThread *thread;

          kd_mutex_lock (&self->spawn_lock);
          thread = g_steal_pointer (&worker->thread);
          kd_mutex_unlock (&self->spawn_lock);

          if (thread == NULL)
            continue;   /* never made: the start failed, or nobody started it */
          if (thread == g_thread_self ())
            {
              g_thread_unref (thread);
              continue;
            }
          g_thread_join (thread);
          kd_tsan_acquire (worker);
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
  g_assert (kd_ring_is_empty (&self->values));

  for (i = 0; i < self->n_groups + 2; i++)
    {
      g_assert (self->groups[i].tasks.length == 0);
      g_mutex_clear (&self->groups[i].lock);
    }
  for (i = 0; i < kd_slots_length (&self->workers); i++)
    {
      KdWorker *worker = worker_at (self, i);

      g_clear_error (&worker->start_error);
      g_cond_clear (&worker->cond);
    }
  kd_slots_clear (&self->workers);

  g_mutex_clear (&self->idle_lock);
  g_mutex_clear (&self->spawn_lock);
  g_mutex_clear (&self->join_lock);
  g_mutex_clear (&self->start_lock);
  g_cond_clear (&self->start_cond);
  g_mutex_clear (&self->timer_lock);
  g_cond_clear (&self->hurry_cond);
  g_aligned_free (self->groups);
  kd_ring_clear (&self->values);
  g_aligned_free (self);
}

/* Any thread but a worker of @self's, one at a time (the owner's lock),
 * before the shutdown: n-workers becomes @n_workers, and starts on demand
 * are allowed again. Growing starts a thread in each vacant slot from the
 * old count up to the new one and waits for their start hooks (slots
 * below the old count that idle workers left start on demand); if a
 * thread cannot be made or a start hook fails, the scheduler keeps the
 * workers that started (n-workers stops after the last of them), starts
 * none on demand until the next resize, and returns FALSE with the first
 * error. Shrinking returns at once: each worker above the count exits once
 * its task is done (the last ready one only once another runs), leaving
 * its queued tasks to the others. */
gboolean
kd_scheduler_resize (KdScheduler  *self,
                     guint         n_workers,
                     GError      **error)
{
  GError *local_error = NULL;
  guint i, old, kept;

  g_assert (n_workers > 0);

  kd_mutex_lock (&self->spawn_lock);
  if (g_atomic_int_get (&self->shutting_down))
    {
      kd_mutex_unlock (&self->spawn_lock);
      return TRUE;
    }
  old = (guint) g_atomic_int_get (&self->n_target);
  add_slots (self, n_workers);
  g_atomic_int_set (&self->n_target, (gint) n_workers);
  g_atomic_int_set (&self->starts_failed, FALSE);
  for (i = old; i < n_workers; i++)
    {
      KdWorker *worker = worker_at (self, i);

      if (worker->state != SLOT_VACANT)
        continue;   /* still running from before a shrink */
      kd_mutex_lock (&self->start_lock);
      worker->awaited = TRUE;
      worker->start_result = START_PENDING;
      kd_mutex_unlock (&self->start_lock);
      if (!spawn_locked (self, worker, TRUE, &local_error))
        {
          kd_mutex_lock (&self->start_lock);
          worker->awaited = FALSE;
          kd_mutex_unlock (&self->start_lock);
          g_prefix_error (&local_error, "Could not start worker thread %u of %u: ",
                          i + 1, n_workers);
          g_atomic_int_set (&self->starts_failed, TRUE);
          break;
        }
    }
  update_wanted_locked (self);
  kd_mutex_unlock (&self->spawn_lock);

  /* The workers that started report how it went. */
  kd_mutex_lock (&self->start_lock);
  for (i = old; i < n_workers; i++)
    {
      KdWorker *worker = worker_at (self, i);

      if (!worker->awaited)
        continue;
      while (worker->start_result == START_PENDING)
        kd_cond_wait (&self->start_cond, &self->start_lock);
      worker->awaited = FALSE;
      if (worker->start_result == START_ABORT && local_error == NULL)
        local_error = g_steal_pointer (&worker->start_error);
      g_clear_error (&worker->start_error);
    }
  kd_mutex_unlock (&self->start_lock);

  if (local_error != NULL)
    {
      /* n-workers stops after the last worker that runs, at least the
       * old count. */
      kd_mutex_lock (&self->spawn_lock);
      for (kept = old, i = old; i < n_workers; i++)
        if (worker_at (self, i)->state == SLOT_RUNNING)
          kept = i + 1;
      g_atomic_int_set (&self->n_target, (gint) kept);
      g_atomic_int_set (&self->starts_failed, TRUE);
      update_wanted_locked (self);
      kd_mutex_unlock (&self->spawn_lock);
      g_propagate_error (error, local_error);
    }

  /* Parked workers look at the count again (and a shrink's go). */
  wake_all_parked (self);
  return local_error == NULL;
}

/* Any thread: an idle worker exits after @idle_us parked (0: never) while
 * more than @min_ready workers are ready (at least 1); a pusher starts one
 * again on demand. */
void
kd_scheduler_set_idle_exit (KdScheduler *self,
                            gint64       idle_us,
                            guint        min_ready)
{
  kd_mutex_lock (&self->spawn_lock);
  __atomic_store_n (&self->idle_exit_us, MAX (idle_us, 0), __ATOMIC_RELAXED);
  g_atomic_int_set (&self->min_ready, (gint) MAX (min_ready, 1));
  kd_mutex_unlock (&self->spawn_lock);

  /* Parked workers sleep again with the new time. */
  wake_all_parked (self);
}

/* n-workers: the threads the scheduler runs when busy. */
guint
kd_scheduler_get_n_workers (KdScheduler *self)
{
  return (guint) g_atomic_int_get (&self->n_target);
}

/* The worker threads running right now (some maybe still starting). */
guint
kd_scheduler_get_n_threads (KdScheduler *self)
{
  return (guint) g_atomic_int_get (&self->n_threads);
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
