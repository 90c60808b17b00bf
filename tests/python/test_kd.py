#!/usr/bin/python3
# test_kd.py: kdispatch from Python, through GObject introspection (Kd-1)
#
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Handlers, done callbacks and async callbacks written in Python: per-key
# order, a handler's exception reaching the done callback, async submits on
# a main loop, cancellation, properties, and a clean exit. Prints TAP.

import gc
import sys
import threading

import gi

gi.require_version('Kd', '1')
gi.require_version('Gio', '2.0')
from gi.repository import GLib, Gio, Kd  # noqa: E402

DEADLINE_S = 60
results = []


def check(name, condition, detail=''):
    results.append(condition)
    print('%s %d %s%s' % ('ok' if condition else 'not ok', len(results), name,
                          '' if condition else ' # ' + detail))
    sys.stdout.flush()


def test_order_and_errors():
    n_keys, per_key = 20, 200
    lock = threading.Lock()
    next_seq = {}
    violations = []
    outcomes = {}

    def handler(job):
        key, item = job.get_key(), job.get_item()
        seq = item % per_key
        # One job of a key at a time: no lock needed for next_seq[key].
        if next_seq.get(key, 0) != seq:
            violations.append((key, seq))
        next_seq[key] = seq + 1
        if seq % 7 == 3:
            raise GLib.Error('item %d is refused' % item)
        return True

    def done(job, error):
        with lock:
            outcomes[job.get_item()] = error.message if error else None

    dispatcher = Kd.Dispatcher.new(4, handler)
    dispatcher.set_capacity(64)
    dispatcher.set_done_func(done)
    for seq in range(per_key):
        for k in range(n_keys):
            dispatcher.submit('client-%d' % k, k * per_key + seq)
    dispatcher.wait()

    n = n_keys * per_key
    failing = [i for i in range(n) if (i % per_key) % 7 == 3]
    check('every job ended once', len(outcomes) == n, '%d of %d' % (len(outcomes), n))
    check('per-key order', not violations, str(violations[:5]))
    check("a handler's exception reaches the done callback",
          all(outcomes.get(i) == 'item %d is refused' % i for i in failing),
          str([outcomes.get(i) for i in failing[:3]]))
    check('the others completed',
          sum(1 for v in outcomes.values() if v is None) == n - len(failing))
    check('counters as properties',
          dispatcher.props.completed == n - len(failing) and
          dispatcher.props.failed == len(failing) and dispatcher.props.pending == 0,
          '%d %d' % (dispatcher.props.completed, dispatcher.props.failed))


def test_async():
    loop = GLib.MainLoop()
    n_keys, per_key = 5, 100
    order = {}
    violations = []
    called = [0]
    main_thread = threading.current_thread()
    wrong_thread = []

    def handler(job):
        return True

    def on_done(dispatcher, result, item):
        if threading.current_thread() is not main_thread:
            wrong_thread.append(item)
        ok = dispatcher.submit_finish(result)
        key, seq = divmod(item, per_key)
        if not ok or order.get(key, 0) != seq:
            violations.append(item)
        order[key] = seq + 1
        called[0] += 1
        if called[0] == n_keys * per_key:
            loop.quit()

    dispatcher = Kd.Dispatcher.new(2, handler)
    dispatcher.set_capacity(8)   # most submissions wait for room, without blocking
    dispatcher.set_max_waiting(n_keys * per_key)
    for seq in range(per_key):
        for k in range(n_keys):
            dispatcher.submit_async('k%d' % k, k * per_key + seq, None, on_done,
                                    k * per_key + seq)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    check('async callbacks all ran', called[0] == n_keys * per_key, str(called[0]))
    check('async callbacks in per-key order, completed', not violations, str(violations[:5]))
    check('async callbacks on the main loop thread', not wrong_thread)


def test_wait_async():
    loop = GLib.MainLoop()
    gate = threading.Event()
    ended = []
    outcome = {}

    def handler(job):
        if job.get_item() == 0:
            gate.wait(DEADLINE_S)
        return True

    def done(job, error):
        ended.append(job.get_item())

    def on_waited(dispatcher, result, name):
        outcome[name] = (dispatcher.wait_finish(result), len(ended))
        if 'all' in outcome:
            loop.quit()

    dispatcher = Kd.Dispatcher.new(2, handler)
    dispatcher.set_done_func(done)
    for i in range(10):
        dispatcher.submit('k', i)
    check('wait_until gives up while a job is held',
          not dispatcher.wait_until(GLib.get_monotonic_time() + 1000))
    dispatcher.wait_async(None, on_waited, 'all')
    GLib.idle_add(gate.set)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    check('wait_async completes after every job ended', outcome.get('all') == (True, 10),
          str(outcome))
    check('wait_until succeeds once they have',
          dispatcher.wait_until(GLib.get_monotonic_time() + DEADLINE_S * 1000000))


def test_cancel():
    release = threading.Event()
    started = threading.Event()
    errors = {}
    lock = threading.Lock()

    def handler(job):
        if job.get_item() == 0:
            started.set()
            release.wait(DEADLINE_S)
        return True

    def done(job, error):
        with lock:
            errors[job.get_item()] = error

    cancellable = Gio.Cancellable()
    dispatcher = Kd.Dispatcher.new(1, handler)
    dispatcher.set_cancellable(cancellable)
    dispatcher.set_done_func(done)
    for i in range(10):
        dispatcher.submit('k', i)
    started.wait(DEADLINE_S)
    cancellable.cancel()
    refused = False
    try:
        dispatcher.submit('k', 99)
    except GLib.Error as e:
        refused = e.matches(Kd.error_quark(), Kd.Error.CLOSED)
    release.set()
    dispatcher.wait()

    cancelled = [i for i in range(1, 10)
                 if errors.get(i) is not None and
                 errors[i].matches(Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED)]
    check('cancel: the running job ends as its handler says', errors.get(0, 'x') is None)
    check('cancel: every queued job is handed back cancelled', len(cancelled) == 9,
          str(sorted(errors)))
    check('cancel: a later submit fails with KD_ERROR_CLOSED', refused)
    check('cancel: stats add up', dispatcher.props.cancelled == 9 and
          dispatcher.props.submitted == 10 and dispatcher.props.rejected == 1)


def test_submit_many():
    n_keys, per_key, batch = 10, 100, 64
    next_seq = {}
    violations = []
    ran = []
    lock = threading.Lock()

    def handler(job):
        key, item = job.get_key(), job.get_item()
        with lock:
            ran.append(item)
        if key is not None:
            seq = item % per_key
            if next_seq.get(key, 0) != seq:
                violations.append((key, seq))
            next_seq[key] = seq + 1
        return True

    dispatcher = Kd.Dispatcher.new(4, handler)
    dispatcher.set_capacity(32)
    keys, items = [], []
    for seq in range(per_key):
        for k in range(n_keys):
            keys.append('k%d' % k)
            items.append(k * per_key + seq)
    taken = 0
    for i in range(0, len(items), batch):
        taken += dispatcher.submit_many(keys[i:i + batch], items[i:i + batch])
    unkeyed = list(range(10000, 10100))
    taken += dispatcher.submit_many(None, unkeyed)
    dispatcher.wait()

    n = n_keys * per_key + len(unkeyed)
    check('submit_many: every item taken', taken == n, '%d of %d' % (taken, n))
    check('submit_many: every item ran once', sorted(ran) == sorted(items + unkeyed))
    check('submit_many: per-key order inside and across batches', not violations,
          str(violations[:5]))

    dispatcher.close()
    try:
        dispatcher.try_submit_many(None, [1, 2, 3])
        refused = False
    except GLib.Error as error:
        refused = error.matches(Kd.error_quark(), Kd.Error.CLOSED)
    check('submit_many: a closed dispatcher refuses the batch with CLOSED', refused)
    check('submit_many: refused items count as rejected', dispatcher.props.rejected == 3,
          str(dispatcher.props.rejected))


def test_group():
    loop = GLib.MainLoop()
    gate = threading.Event()
    lock = threading.Lock()
    ended = {}
    seen_group = []
    outcome = {}

    def handler(job):
        item = job.get_item()
        seen_group.append(job.get_group_cancellable())
        if item == 1000:
            gate.wait(DEADLINE_S)
        if item == 3:
            raise GLib.Error('item 3 failed')
        return True

    def done(job, error):
        with lock:
            ended[job.get_item()] = error.message if error else None

    dispatcher = Kd.Dispatcher.new(1, handler)
    dispatcher.set_done_func(done)
    outside = Kd.Group.new(dispatcher)
    group = Kd.Group.new(dispatcher)
    group.set_fail_fast(True)
    check('group: fail-fast is a property', group.props.fail_fast)
    outside.submit('held', 1000)     # holds the one worker until released
    for i in range(10):
        group.submit('k', i)

    def on_waited(source, result, name):
        try:
            outcome[name] = source.wait_finish(result)
        except GLib.Error as error:
            outcome[name] = error.message
        loop.quit()

    check('group: wait_until gives up while its jobs are queued',
          not wait_until(group, GLib.get_monotonic_time() + 1000))
    group.wait_async(None, on_waited, 'group')
    GLib.idle_add(gate.set)
    GLib.timeout_add_seconds(DEADLINE_S, loop.quit)
    loop.run()
    check('group: wait_async reports the first failure', outcome.get('group') == 'item 3 failed',
          str(outcome))
    check('group: the failure cancelled the jobs after it',
          all(ended.get(i) is not None for i in range(4, 10)) and
          all(ended.get(i) is None for i in range(3)),
          str(ended))
    stats = group.get_stats()
    check('group: counters are the group\'s own',
          (stats.submitted, stats.completed, stats.failed, stats.cancelled, stats.pending) ==
          (10, 3, 1, 6, 0), '%d %d %d %d %d' % (stats.submitted, stats.completed, stats.failed,
                                              stats.cancelled, stats.pending))
    check('group: a handler sees its job\'s group\'s cancellable',
          seen_group[0] == outside.get_cancellable() and group.get_cancellable() in seen_group)
    try:
        group.try_submit(None, 99)
        refused = False
    except GLib.Error as error:
        refused = error.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CANCELLED)
    check('group: a cancelled group refuses with CANCELLED', refused)
    check('group: the other group is untouched', outside.wait())
    dispatcher.wait()


def test_delayed():
    ran = []
    lock = threading.Lock()

    def handler(job):
        with lock:
            ran.append((job.get_item(), GLib.get_monotonic_time()))
        return True

    dispatcher = Kd.Dispatcher.new(2, handler)
    due = GLib.get_monotonic_time() + 2000
    dispatcher.submit_at('k', 1, due)
    dispatcher.submit_after('k', 2, 2000)
    dispatcher.submit_after(None, 3, 0)
    dispatcher.wait()
    times = dict(ran)
    check('delayed: every delayed job ran', sorted(times) == [1, 2, 3], str(ran))
    check('delayed: none before its due time', times.get(1, 0) >= due and times.get(2, 0) >= due,
          str(ran))
    keyed = [item for item, _ in ran if item != 3]
    check('delayed: one key\'s jobs due in call order run in it', keyed == [1, 2], str(keyed))

    small = Kd.Dispatcher.new(1, handler)
    small.set_capacity(1)
    small.submit_after('k', 4, 3600 * 1000000)
    try:
        small.submit_after('k', 5, 0)
        refused = False
    except GLib.Error as error:
        refused = error.matches(Kd.error_quark(), Kd.Error.FULL)
    check('delayed: a waiting job holds its unit: the next is refused FULL', refused)
    small.get_cancellable().cancel()
    small.wait()
    check('delayed: cancelling ends the waiting job without running it',
          4 not in dict(ran) and small.props.cancelled == 1, str(small.props.cancelled))


def test_priority():
    ran = []
    gate = threading.Event()
    arrived = threading.Event()

    def handler(job):
        if job.get_item() == 0:
            arrived.set()
            gate.wait(DEADLINE_S)
        ran.append(job.get_item())
        return True

    dispatcher = Kd.Dispatcher.new(1, handler)
    urgent = Kd.Group.new(dispatcher)
    urgent.set_priority(GLib.PRIORITY_HIGH)
    check('priority: reads back', urgent.get_priority() == GLib.PRIORITY_HIGH
          and urgent.props.priority == GLib.PRIORITY_HIGH)
    dispatcher.submit(None, 0)
    arrived.wait(DEADLINE_S)
    for i in range(1, 21):
        dispatcher.submit(None, i)
    urgent.submit(None, 100)
    gate.set()
    dispatcher.wait()
    check('priority: the urgent job overtakes the queued ones', ran[:2] == [0, 100], str(ran[:5]))


def test_workers():
    inits = []
    lock = threading.Lock()

    def worker_init(dispatcher, index):
        with lock:
            inits.append(index)
        return None

    def worker_finalize(dispatcher, index, data):
        pass

    dispatcher = Kd.Dispatcher.new(1, lambda job: True)
    dispatcher.set_worker_funcs(worker_init, worker_finalize)
    dispatcher.start()
    dispatcher.set_n_workers(3)
    stats = dispatcher.get_stats()
    check('workers: growing starts the new workers and their inits',
          dispatcher.get_n_workers() == 3 and stats.threads == 3 and sorted(inits) == [0, 1, 2],
          '%d %d %s' % (dispatcher.get_n_workers(), stats.threads, inits))
    dispatcher.props.n_workers = 2
    check('workers: the property resizes', dispatcher.get_n_workers() == 2)
    dispatcher.set_worker_idle_time(5000, 1)
    idle_us, min_workers = dispatcher.get_worker_idle_time()
    check('workers: the idle time reads back', (idle_us, min_workers) == (5000, 1),
          str((idle_us, min_workers)))
    for i in range(20):
        dispatcher.submit(None, i)
    dispatcher.wait()
    check('workers: jobs run after resizes', dispatcher.props.completed == 20)


def wait_until(group, end_time):
    try:
        return group.wait_until(end_time)
    except GLib.Error:
        return False


test_order_and_errors()
test_submit_many()
test_async()
test_wait_async()
test_group()
test_delayed()
test_workers()
test_priority()
test_cancel()
gc.collect()
print('1..%d' % len(results))
sys.exit(0 if all(results) else 1)
