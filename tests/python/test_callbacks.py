#!/usr/bin/python3
# test_callbacks.py: every kdispatch call that takes a callback or an item,
# from Python, under G_DEBUG=fatal-warnings (meson sets it): a wrong
# annotation makes PyGObject warn, and the warning aborts. Prints TAP.
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import sys
import threading

import gi

gi.require_version('Kd', '1')
from gi.repository import GLib, Kd  # noqa: E402

DEADLINE_S = 60
results = []


def check(name, condition, detail=''):
    results.append(condition)
    print('%s %d %s%s' % ('ok' if condition else 'not ok', len(results), name,
                          '' if condition else ' # ' + detail))
    sys.stdout.flush()


def test_pipeline_emit_and_sink():
    out = []
    lock = threading.Lock()

    def double(job):
        job.emit(job.get_key(), job.get_item() * 2)
        return True

    def sink(key, item):
        with lock:
            out.append((key, item))

    pipeline = Kd.Pipeline.new()
    pipeline.add_stage('double', 2, double)
    pipeline.set_sink(sink)
    for i in range(200):
        pipeline.submit('k%d' % (i % 4), i)
    pipeline.submit_many(['k0', None], [1000, 1001])
    pipeline.wait()
    check('pipeline: every emitted item reaches the sink, doubled',
          sorted(item for _, item in out) == sorted([2 * i for i in range(200)] + [2000, 2002]),
          str(len(out)))
    in_order = all([item for key, item in out if key == 'k%d' % k] ==
                   sorted(item for key, item in out if key == 'k%d' % k) for k in range(1, 4))
    check('pipeline: a key\'s items reach the sink in order', in_order)


def test_workers():
    inits, finals, seen = [], [], []
    lock = threading.Lock()

    def init(dispatcher, index):
        with lock:
            inits.append(index)
        return 100 + index

    def finalize(dispatcher, index, data):
        with lock:
            finals.append((index, data))

    def handler(job):
        with lock:
            seen.append((job.get_worker_data(), job.get_attempt()))
        return True

    dispatcher = Kd.Dispatcher.new(2, handler)
    dispatcher.set_worker_funcs(init, finalize)
    for i in range(40):
        dispatcher.submit('key-%d' % (i % 5), i)
    dispatcher.close()
    dispatcher.wait()
    # (A gpointer a Python callback returns does not come back as the same
    # integer: the worker data's value is not checked here.)
    check('worker funcs: init and finalize run once on each worker, around its jobs',
          sorted(inits) == [0, 1] and sorted(index for index, _ in finals) == [0, 1] and
          len(seen) == 40 and all(attempt == 1 for _, attempt in seen),
          '%s %s' % (inits, finals))


def test_failure_callbacks():
    dead = []

    def handler(job):
        raise GLib.Error('always fails')

    def dead_letter(job, error):
        dead.append((job.get_item(), error.message, job.get_attempt()))

    dispatcher = Kd.Dispatcher.new(1, handler)
    dispatcher.set_retry(2, 100, 100)
    dispatcher.set_dead_letter_func(dead_letter)
    dispatcher.submit('k', 7)
    dispatcher.wait()
    check('dead letter: the failed job after its last attempt',
          dead == [(7, 'always fails', 2)], str(dead))


def test_groups_and_delays():
    loop = GLib.MainLoop()
    outcome = {}
    cancellables = []

    def handler(job):
        cancellables.append(job.get_group_cancellable())
        return True

    dispatcher = Kd.Dispatcher.new(2, handler)
    group = Kd.Group.new(dispatcher)

    def submitted(source, result, name):
        outcome[name] = source.submit_finish(result)

    def waited(source, result, name):
        outcome[name] = source.wait_finish(result)
        loop.quit()

    group.submit('a', 1)
    group.try_submit('a', 2)
    group.submit_timeout(None, 3, 1000000)
    group.submit_async('a', 4, None, submitted, 'async')
    dispatcher.submit_after('b', 5, 1000)
    dispatcher.submit_at('b', 6, GLib.get_monotonic_time())
    group.wait_async(None, waited, 'wait')
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    dispatcher.wait()
    stats = group.get_stats()
    check('group: async submit and wait through a main loop',
          outcome == {'async': True, 'wait': True}, str(outcome))
    check('group: its four jobs counted', stats.submitted == 4 and stats.completed == 4,
          '%d %d' % (stats.submitted, stats.completed))
    check('group: handlers see its cancellable',
          cancellables.count(group.get_cancellable()) == 4 and cancellables.count(None) == 2,
          str(cancellables))


def test_deferred():
    loop = GLib.MainLoop()
    lock = threading.Lock()
    last = {}
    state = {'out_of_order': 0, 'ended': 0, 'failed': 0}
    total = 60

    def return_it(job):
        # On the main loop: item 1003 fails, the others complete.
        if job.get_item() == 1003:
            job.return_error_literal(GLib.quark_from_string('test'), 1, 'refused')
        else:
            job.return_success()
        return GLib.SOURCE_REMOVE

    def handler(job):
        key, item = job.get_key(), job.get_item()
        with lock:
            if item % 1000 != last.get(key, 0) + 1:
                state['out_of_order'] += 1
            last[key] = item % 1000
        job.defer()
        GLib.timeout_add(1, return_it, job)
        return True

    def done(job, error):
        state['ended'] += 1
        if error is not None:
            state['failed'] += 1
        if state['ended'] == total:
            loop.quit()

    dispatcher = Kd.Dispatcher.new(1, handler)
    dispatcher.set_done_func(done)
    for n in range(1, total // 3 + 1):
        for k in range(3):
            dispatcher.submit('k%d' % k, k * 1000 + n)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    # (Not wait(): if the deadline stopped the loop, jobs still out could
    # only be returned by it.)
    dispatcher.wait_until(GLib.get_monotonic_time() + DEADLINE_S * 1000000)
    stats = dispatcher.get_stats()
    check('deferred: jobs returned from GLib.timeout_add callbacks end in per-key order',
          state['ended'] == total and state['out_of_order'] == 0, str(state))
    check('deferred: a job returned with an error fails, the others complete',
          state['failed'] == 1 and stats.completed == total - 1 and stats.failed == 1,
          '%s %d %d' % (state, stats.completed, stats.failed))


def test_handler_context():
    loop = GLib.MainLoop()
    main_thread = threading.current_thread()
    state = {'ended': 0, 'off_main': 0, 'out_of_order': 0}
    last = {}
    total = 30

    def handler(job):
        # On the main loop's thread, as GJS needs its callbacks.
        if threading.current_thread() is not main_thread:
            state['off_main'] += 1
        key, item = job.get_key(), job.get_item()
        if item % 1000 != last.get(key, 0) + 1:
            state['out_of_order'] += 1
        last[key] = item % 1000
        if item % 2 == 0:
            job.defer()
            GLib.idle_add(lambda: job.return_success() or GLib.SOURCE_REMOVE)
        return True

    def done(job, error):
        state['ended'] += 1
        if state['ended'] == total:
            loop.quit()

    dispatcher = Kd.Dispatcher.new(2, handler)
    dispatcher.set_handler_context(GLib.MainContext.default())
    dispatcher.set_main_context(GLib.MainContext.default())
    dispatcher.set_done_func(done)
    for n in range(1, total // 3 + 1):
        for k in range(3):
            dispatcher.submit('k%d' % k, k * 1000 + n)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    dispatcher.wait_until(GLib.get_monotonic_time() + DEADLINE_S * 1000000)
    check('handler context: every handler runs on the main loop\'s thread, in per-key order',
          state == {'ended': total, 'off_main': 0, 'out_of_order': 0}, str(state))


test_pipeline_emit_and_sink()
test_workers()
test_failure_callbacks()
test_groups_and_delays()
test_deferred()
test_handler_context()
print('1..%d' % len(results))
sys.exit(0 if all(results) else 1)
