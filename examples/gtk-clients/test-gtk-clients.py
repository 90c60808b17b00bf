#!/usr/bin/env python3
# test-gtk-clients.py XVFB_RUN GTK_CLIENTS ARGS...: runs the GTK demo under
# Xvfb with --run-and-quit and checks its exit status and the counts it
# prints (key=value lines).
#
# SPDX-License-Identifier: LGPL-2.1-or-later

import os
import subprocess
import sys

xvfb_run, demo, args = sys.argv[1], sys.argv[2], sys.argv[3:]

env = dict(os.environ,
           GDK_BACKEND='x11',       # Xvfb is an X server
           GSK_RENDERER='cairo',    # no GL there
           GTK_A11Y='none',         # no accessibility bus either
           NO_AT_BRIDGE='1')
command = [xvfb_run, '-a', '-s', '-screen 0 1024x768x24', demo, '--run-and-quit'] + args
proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
sys.stdout.write(proc.stdout)
sys.stderr.write(proc.stderr)

failures = []
if proc.returncode != 0:
    failures.append('exit status %d' % proc.returncode)

counts = dict(line.split('=', 1) for line in proc.stdout.splitlines() if '=' in line)
required = ['planned', 'submitted', 'completed', 'failed', 'handed-back', 'never-sent',
            'cancelled', 'out-of-order', 'frames', 'checks']
missing = [key for key in required if key not in counts]
if missing:
    print('missing counts: %s' % ', '.join(missing))
    sys.exit(1)

n = {key: int(value) for key, value in counts.items() if value.isdigit()}
jobs = int(args[args.index('--jobs') + 1])
cancel_after = int(args[args.index('--cancel-after') + 1]) if '--cancel-after' in args else 0


def check(condition, what):
    if not condition:
        failures.append(what)


check(counts['checks'] == 'passed', 'the demo\'s own checks failed')
check(n['out-of-order'] == 0, 'messages out of order')
check(n['planned'] == jobs, 'planned %d, asked for %d' % (n['planned'], jobs))
check(n['submitted'] + n['never-sent'] == n['planned'], 'submitted + never sent != planned')
check(n['completed'] + n['failed'] + n['handed-back'] == n['submitted'],
      'completed + failed + handed back != submitted: a message was lost or ended twice')
check(n['failed'] == 0, 'failed messages')
check(n['frames'] > 0, 'the window drew no frame during the run')
if cancel_after:
    check(counts['cancelled'] == 'yes', 'the run was not cancelled')
    check(n['completed'] >= cancel_after, 'cancelled before %d messages were handled' % cancel_after)
else:
    check(counts['cancelled'] == 'no', 'the run was cancelled')
    check(n['completed'] == jobs and n['handed-back'] == 0 and n['never-sent'] == 0,
          'not every message was handled')

for failure in failures:
    print('FAIL: %s' % failure)
sys.exit(1 if failures else 0)
