/* kd-sync-private.h: locks that ThreadSanitizer can see, and hand-off marks
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * kd_mutex_lock() spins briefly before it sleeps (see KD_MUTEX_SPINS).
 *
 * Debian's GLib is not built with ThreadSanitizer, and GMutex, GCond and
 * GAsyncQueue are futex-based, so TSan cannot see the ordering they give and
 * would report races on correct code. Every lock in kdispatch goes through
 * these wrappers, which tell TSan about each acquire and release; data that
 * crosses threads inside a GAsyncQueue is marked with kd_tsan_release() before
 * the push and kd_tsan_acquire() after the pop. Without TSan they compile to
 * the plain GLib calls.
 */

#pragma once

#include <glib.h>

#if defined(__SANITIZE_THREAD__)
# define KD_TSAN 1
#elif defined(__has_feature)
# if __has_feature(thread_sanitizer)
#  define KD_TSAN 1
# endif
#endif

#ifdef KD_TSAN
# include <sanitizer/tsan_interface.h>
#endif

G_BEGIN_DECLS

/* Thread-local variables read on every job: the initial-exec model reads
 * them straight from the thread pointer instead of calling __tls_get_addr.
 * kdispatch has two pointers of them, well within the static TLS space
 * glibc keeps for libraries loaded later (as GObject introspection does). */
#define KD_THREAD_LOCAL __thread __attribute__ ((tls_model ("initial-exec")))

/* How many times a thread retries a held lock, with a pause between tries,
 * before it sleeps in the kernel. kdispatch holds its locks for tens of
 * nanoseconds; GMutex goes straight to a futex wait on contention, which
 * costs microseconds and a wake-up syscall on the unlock side. */
#define KD_MUTEX_SPINS 100

/* How long a thread blocked for room (in a dispatcher's bound or an ordered
 * stage's tickets) sleeps before it looks for room by itself: it is woken
 * only once a share of the bound is free, and a smaller gap may never grow
 * if the running handlers wait for that thread. The sleep doubles from MIN
 * to MAX while nothing changes. */
#define KD_ROOM_RECHECK_MIN_US (1 * G_TIME_SPAN_MILLISECOND)
#define KD_ROOM_RECHECK_MAX_US (16 * G_TIME_SPAN_MILLISECOND)

static inline void
kd_cpu_relax (void)
{
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause ();
#elif defined(__aarch64__)
  __asm__ __volatile__ ("yield");
#endif
}

static inline void
kd_mutex_lock (GMutex *mutex)
{
  guint spins;

#ifdef KD_TSAN
  __tsan_mutex_pre_lock (mutex, 0);
#endif
  for (spins = 0; !g_mutex_trylock (mutex); spins++)
    {
      if (spins == KD_MUTEX_SPINS)
        {
          g_mutex_lock (mutex);
          break;
        }
      kd_cpu_relax ();
    }
#ifdef KD_TSAN
  __tsan_mutex_post_lock (mutex, 0, 0);
#endif
}

static inline void
kd_mutex_unlock (GMutex *mutex)
{
#ifdef KD_TSAN
  __tsan_mutex_pre_unlock (mutex, 0);
#endif
  g_mutex_unlock (mutex);
#ifdef KD_TSAN
  __tsan_mutex_post_unlock (mutex, 0);
#endif
}

/* The mutex is released while waiting and held again on return, so TSan is
 * told of an unlock before and a lock after. */
static inline void
kd_cond_wait (GCond  *cond,
              GMutex *mutex)
{
#ifdef KD_TSAN
  __tsan_mutex_pre_unlock (mutex, 0);
  __tsan_mutex_post_unlock (mutex, 0);
#endif
  g_cond_wait (cond, mutex);
#ifdef KD_TSAN
  __tsan_mutex_pre_lock (mutex, 0);
  __tsan_mutex_post_lock (mutex, 0, 0);
#endif
}

static inline gboolean
kd_cond_wait_until (GCond  *cond,
                    GMutex *mutex,
                    gint64  end_time)
{
  gboolean signalled;

#ifdef KD_TSAN
  __tsan_mutex_pre_unlock (mutex, 0);
  __tsan_mutex_post_unlock (mutex, 0);
#endif
  signalled = g_cond_wait_until (cond, mutex, end_time);
#ifdef KD_TSAN
  __tsan_mutex_pre_lock (mutex, 0);
  __tsan_mutex_post_lock (mutex, 0, 0);
#endif
  return signalled;
}

static inline void
kd_tsan_release (gconstpointer addr)
{
#ifdef KD_TSAN
  __tsan_release ((void *) addr);
#else
  (void) addr;
#endif
}

static inline void
kd_tsan_acquire (gconstpointer addr)
{
#ifdef KD_TSAN
  __tsan_acquire ((void *) addr);
#else
  (void) addr;
#endif
}

G_END_DECLS
