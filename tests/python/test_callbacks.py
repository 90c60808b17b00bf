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
from gi.repository import GLib, GObject, Kd  # noqa: E402

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


class Thing(GObject.Object):
    """A GObject of the application's, carrying Python data of its own."""

    def __init__(self, key, n):
        super().__init__()
        self.key, self.n = key, n


def test_values():
    # Dicts and GObjects through a dispatcher: the handler and the done
    # callback get the very object submitted, in each key's order.
    lock = threading.Lock()
    seen, done_seen, last = [], [], {}
    state = {'out_of_order': 0, 'wrong_object': 0}
    items = {}

    def handler(job):
        value = job.get_value()
        if isinstance(value, dict) and 'probe' in value:
            return True
        key, n = (value['key'], value['n']) if isinstance(value, dict) else (value.key, value.n)
        with lock:
            if items[(key, n)] is not value:
                state['wrong_object'] += 1
            if n != last.get(key, 0) + 1:
                state['out_of_order'] += 1
            last[key] = n
            seen.append(value)
        return True

    def done(job, error):
        with lock:
            done_seen.append(job.get_value())

    dispatcher = Kd.Dispatcher.new(3, handler)
    dispatcher.set_done_func(done)
    for n in range(1, 101):
        for k in range(4):
            key = 'k%d' % k
            value = {'key': key, 'n': n} if n % 2 else Thing(key, n)
            items[(key, n)] = value
            if n % 5 == 0:
                dispatcher.try_submit_value(key, value)
            else:
                dispatcher.submit_value(key, value)
    dispatcher.wait()
    check('values: dicts and GObjects reach the handler as the objects submitted, in '
          'per-key order', len(seen) == 400 and state == {'out_of_order': 0, 'wrong_object': 0},
          '%d %s' % (len(seen), state))
    check('values: the done callback gets the same objects',
          sorted(id(v) for v in done_seen) == sorted(id(v) for v in items.values()))

    # The dispatcher's copies are gone once the jobs ended: only our
    # references are left.
    probe = {'probe': True}
    before = sys.getrefcount(probe)
    dispatcher.submit_value('k0', probe)
    dispatcher.wait()
    del seen[:], done_seen[:]
    check('values: the dispatcher keeps no reference once the job ended',
          sys.getrefcount(probe) == before, '%d %d' % (sys.getrefcount(probe), before))

    # Async, with the finish call.
    loop = GLib.MainLoop()
    finished = []

    def on_submitted(source, result, value):
        finished.append((source.submit_finish(result), value))
        if len(finished) == 2:
            loop.quit()

    async_items = [{'key': 'k9', 'n': 1}, Thing('k9', 2)]
    for value in async_items:
        items[('k9', value['n'] if isinstance(value, dict) else value.n)] = value
        dispatcher.submit_value_async('k9', value, None, on_submitted, value)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    check('values: async value submits complete in order', [ok for ok, _ in finished] == [True, True]
          and [v for _, v in finished] == async_items and state['out_of_order'] == 0, str(finished))

    # A group's async value submit, and a delayed value job.
    group_done = []

    def on_group_submitted(source, result, value):
        group_done.append((source.submit_value_finish(result), value))
        loop.quit()

    delayed = {'key': 'k8', 'n': 1}
    items[('k8', 1)] = delayed
    dispatcher.submit_value_after('k8', delayed, 0)
    grouped = Thing('k7', 1)
    items[('k7', 1)] = grouped
    group = Kd.Group.new(dispatcher)
    group.submit_value_async('k7', grouped, None, on_group_submitted, grouped)
    loop.run()
    group.wait()
    dispatcher.wait()
    check('values: a group\'s async value submit and a delayed value job reach the handler',
          group_done == [(True, grouped)] and delayed in seen and grouped in seen
          and state == {'out_of_order': 0, 'wrong_object': 0}, '%s %s' % (group_done, state))

    # Through a pipeline: a new value emitted, the job's own passed on, and
    # the value sink, in each key's order.
    out = []

    def wrap(job):
        value = job.get_value()
        return job.emit_value(job.get_key(), {'inner': value, 'n': value.n})

    def unwrap(job):
        return job.emit_value(job.get_key(), job.get_value()['inner'])

    def value_sink(key, value):
        with lock:
            out.append((key, value))

    pipeline = Kd.Pipeline.new()
    pipeline.add_stage('wrap', 2, wrap)
    pipeline.add_stage('unwrap', 2, unwrap)
    pipeline.set_value_sink(value_sink)
    things = [Thing('k%d' % (n % 3), n) for n in range(150)]
    for thing in things:
        pipeline.submit_value(thing.key, thing)
    pipeline.close()
    pipeline.wait()
    in_order = all([v.n for k, v in out if k == key] == sorted(v.n for k, v in out if k == key)
                   for key in ('k0', 'k1', 'k2'))
    check('values: GObjects wrapped in dicts and unwrapped through a pipeline reach the value '
          'sink as the objects submitted, in per-key order',
          sorted(id(v) for _, v in out) == sorted(id(t) for t in things) and in_order,
          '%d' % len(out))

    # A stage whose handlers run on the main loop and defer their jobs,
    # emitting from an idle callback: what they emit leaves in each key's
    # order, and the main loop never blocks at the next stage's bound.
    out_async = []
    main_thread = threading.current_thread()
    wrong_thread = []

    def later(job):
        if threading.current_thread() is not main_thread:
            wrong_thread.append(job)
        job.defer()

        def emit_and_return():
            value = job.get_value()
            job.emit_value(job.get_key(), {'n': value.n, 'thing': value})
            job.return_success()
            return GLib.SOURCE_REMOVE
        GLib.idle_add(emit_and_return)
        return True

    def async_sink(key, value):
        out_async.append((key, value['n']))
        if len(out_async) == len(things):
            loop.quit()

    pipeline = Kd.Pipeline.new()
    stage = pipeline.add_stage('on-main-loop', 2, later)
    stage.set_handler_context(GLib.MainContext.default())
    stage.set_capacity(4)
    pipeline.add_stage('pass', 2, lambda job: job.emit_value(job.get_key(), job.get_value()))
    pipeline.get_stage(1).set_capacity(4)
    pipeline.set_value_sink(async_sink)
    # Fed from the main loop itself: the first stage's async submits wait
    # for room without blocking it (a blocking submit would wait for
    # handlers only this loop runs).
    first_stage = pipeline.get_stage(0)
    first_stage.set_max_waiting(len(things))
    for t in things:
        first_stage.submit_value_async(t.key, t, None, None, None)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    pipeline.close()
    pipeline.wait()
    in_order = all([n for k, n in out_async if k == key] == sorted(n for k, n in out_async if k == key)
                   for key in ('k0', 'k1', 'k2'))
    check('values: a stage on the main loop, fed by async submits from that loop, defers its '
          'jobs and emits from idle callbacks, in per-key order', len(out_async) == len(things) and in_order and not wrong_thread,
          '%d %s' % (len(out_async), wrong_thread[:1]))


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
test_values()
test_workers()
test_failure_callbacks()
test_groups_and_delays()
test_deferred()
test_handler_context()
print('1..%d' % len(results))
sys.exit(0 if all(results) else 1)
