/* kd-model.h: a model-based randomized test of KdDispatcher
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * A *program* is decoded from any byte string (every string is a valid
 * program; bytes past the end read as 0): a dispatcher configuration and,
 * for each of a few threads, a list of operations on the dispatcher. Running
 * it starts the threads together against one KdDispatcher, records what each
 * call returned and what the dispatcher's threads did with every item, and
 * checks the result against the contract of API.md. The same runner serves
 * tests/test-model.c (seeds → bytes), tests/fuzz/fuzz-model.c (libFuzzer's
 * bytes) and tests/soak/kd-soak.c (seeds for minutes, watching the RSS).
 *
 * The byte format, in order:
 *
 *   header    10 bytes: workers, fanout, capacity, threads, keys, flags,
 *             rare flags, features (retry, dead letters, park, key
 *             capacity, idle time, worker funcs), retry parameters, key
 *             parameters (see kd_model_program_decode())
 *   ops       each: a selector byte (weighted over the op table), a thread
 *             byte, then the operands the op's decode function reads
 *
 * Async submissions (kd_dispatcher_submit_async()) call back in their
 * thread's own context, which the thread iterates until every callback ran
 * before it drops its reference; a program that parks keys or retries
 * after a huge delay makes none (the callbacks could wait for ever).
 *
 * New operations go in the one table in kd-model-ops.c (a name, a weight, a
 * decode and a run function); nothing else needs to know about them.
 */

#pragma once

#include <glib.h>

G_BEGIN_DECLS

#define KD_MODEL_MAX_THREADS 4
#define KD_MODEL_MAX_WORKERS 6
#define KD_MODEL_MAX_KEYS    8
#define KD_MODEL_MAX_OPS     256
#define KD_MODEL_MAX_ITEMS   768

typedef enum
{
  KD_MODEL_CONTEXT_NONE,     /* done callbacks on the workers */
  KD_MODEL_CONTEXT_LOOP,     /* a main context that a loop thread iterates */
  KD_MODEL_CONTEXT_ITERATE,  /* a main context iterated only by the ITERATE op
                              * and by the flush of the last unref */
} KdModelContextMode;

/* One decoded operation. Which fields mean something depends on @kind. */
typedef struct
{
  guint8 kind;        /* index in the op table */
  guint8 thread;
  guint8 key;         /* submits: a key index; n_keys means unkeyed;
                       * resume: the key */
  guint8 count;       /* submits: items in the burst */
  guint8 fail_rate;   /* submits: in eighths, how many of the items fail */
  guint8 duration;    /* submits: how long their handlers take */
  guint8 arg;         /* submit_timeout: the timeout class; resume: drop
                       * instead */
  guint  first_item;  /* submits: index of the burst's first item */
} KdModelOp;

typedef struct
{
  guint              n_workers;
  guint              fanout;
  guint              capacity;
  guint              n_threads;
  guint              n_keys;
  KdModelContextMode context_mode;
  gboolean           key_states;        /* kd_dispatcher_set_key_state_funcs() */
  gboolean           main_keeps_ref;    /* the main thread drops the last reference */
  gboolean           last_waits;        /* the last holder waits before its unref */
  gboolean           own_cancellable;   /* kd_dispatcher_set_cancellable() */
  gboolean           pre_cancelled;     /* ... with a cancellable already cancelled */
  gboolean           shared_cancel;     /* ... with another, slow ::cancelled handler first */
  gboolean           no_done;           /* no done callback, only item_free */

  /* Failure handling and per-key limits (the features byte) */
  guint              max_attempts;      /* kd_dispatcher_set_retry(); 1: no retry */
  gint64             retry_delay_us;    /* initial delay */
  gint64             retry_max_delay_us;
  gboolean           retry_huge;        /* a delay only a cancel ends */
  gboolean           dead_letter;       /* kd_dispatcher_set_dead_letter_func() */
  gboolean           park;              /* KD_FAILURE_PARK */
  guint              key_capacity;      /* 0: unbounded */
  gint64             key_idle_us;       /* 0: none */
  guint              max_idle_keys;     /* with an idle time; 0: the default */
  guint              max_waiting;       /* async submissions waiting; 0: the default */
  gboolean           worker_funcs;      /* kd_dispatcher_set_worker_funcs() */
  gboolean           start;             /* ... and kd_dispatcher_start() */
  gint64             worker_idle_us;    /* kd_dispatcher_set_worker_idle_time(); 0: none */
  guint              min_workers;       /* ... keeping that many */

  guint              n_ops;
  guint              n_items;           /* items over every submit op */
  KdModelOp          ops[KD_MODEL_MAX_OPS];
} KdModelProgram;

typedef struct
{
  guint64 accepted;
  guint64 refused;
  guint64 refused_closed;
  guint64 completed;
  guint64 failed;
  guint64 cancelled;
  guint64 key_states;    /* states made */
  guint64 retried;       /* handler runs after the first */
  guint64 dead_letters;
  guint64 parks;         /* keys the model saw park */
  guint64 drops;         /* parked keys dropped by the model */
  guint   n_violations;
  char   *report;        /* the first violations, one a line; NULL if none */
  guint   n_known;       /* hits of known library bugs (not violations) */
  char   *known;         /* the first of them; NULL if none */
} KdModelResult;

void     kd_model_program_decode   (KdModelProgram *program,
                                    const guint8   *data,
                                    gsize           size);
char    *kd_model_program_describe (const KdModelProgram *program);

/* Runs @program once. Returns TRUE if every check held; otherwise @result
 * has the violations. Hits of library bugs the model knows of and that are
 * not fixed yet (kd_model_known_bug(), none at the moment) are counted
 * apart, unless KD_MODEL_STRICT=1 is set in the environment, which makes
 * them violations. A run that makes no progress for a minute aborts
 * the process after printing the program and what it saw. */
gboolean kd_model_run              (const KdModelProgram *program,
                                    KdModelResult        *result);
gboolean kd_model_run_bytes        (const guint8         *data,
                                    gsize                 size,
                                    KdModelResult        *result);
void     kd_model_result_clear     (KdModelResult        *result);

/* The selector byte of the op called @name ("submit", "wait", ...), for
 * programs written by hand. */
guint8   kd_model_op_selector      (const char           *name);

/* Drops the debug messages of the "kdispatch" domain (thousands of
 * dispatchers start and stop) unless G_MESSAGES_DEBUG asks for them. */
void     kd_model_quiet_debug      (void);

/* Fatal: the first violation prints where it is and aborts (for the fuzzer,
 * which keeps the input of a crash), instead of being recorded. */
void     kd_model_set_fatal        (gboolean              fatal);

/* The bytes of seed @seed: a splitmix64 stream, 64 to 1024 bytes long.
 * Stable across platforms and GLib versions, so a seed replays anywhere. */
guint8  *kd_model_seed_bytes       (guint64               seed,
                                    gsize                *size);

G_END_DECLS
