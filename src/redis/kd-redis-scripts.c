/* kd-redis-scripts.c: the Lua scripts of a KdRedisQueue
 *
 * SPDX-License-Identifier: LGPL-2.1-or-later
 *
 * Each step of the protocol that must be atomic and carries few entries is
 * one of these scripts; kd_redis_conn_ensure() loads them all when a
 * connection opens, and they run with EVALSHA. See kd-redis-queue.c for the
 * design they implement, and kd-redis-conn.c for how they are run.
 */

#include "config.h"

#include "kd-redis-conn-private.h"

/* Beats and lists the live members. KEYS[1] the members' sorted set;
 * ARGV[1] this member, ARGV[2] how long a member stays live after its last
 * beat (ms), ARGV[3] "1" to leave instead. Scored by the server's clock, so
 * the members' clocks never meet. Long-gone members are dropped. */
static const char script_heartbeat[] =
  "if ARGV[3] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) return {} end\n"
  "local t = redis.call('TIME')\n"
  "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
  "local live = tonumber(ARGV[2])\n"
  "redis.call('ZADD', KEYS[1], now, ARGV[1])\n"
  "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 100 * live)\n"
  "return redis.call('ZRANGEBYSCORE', KEYS[1], now - live, '+inf')\n";

/* Takes leases. KEYS: n lease keys, then their n fencing-token keys;
 * ARGV[1] this member, ARGV[2] the lease time (ms). A free lease is taken
 * with SET NX PX, and its shard's fencing token goes up; one this member
 * still holds is renewed, its token unchanged. Returns per lease the
 * shard's token if this member holds it, or 0. A new token is the server's
 * time in microseconds, or the last token plus one if that is higher: so
 * it goes up even when Redis lost the write of the last one (restarted
 * from an append-only file a second behind, or failed over to a replica
 * that lagged), as long as its clock does not go back by more. Formatted
 * with %.0f: Lua's tostring() keeps 14 digits of the 16. A token key that
 * is not a number (another application's key) costs only its own shard:
 * the lease is let go and the answer is 0 (a script is not rolled back,
 * so an error here would leave earlier leases held and unknown). */
static const char script_acquire[] =
  "local function next_token(fk)\n"
  "  local last = redis.call('GET', fk)\n"
  "  if last and not tonumber(last) then return nil end\n"
  "  local t = redis.call('TIME')\n"
  "  local token = math.max((tonumber(last) or 0) + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))\n"
  "  redis.call('SET', fk, string.format('%.0f', token))\n"
  "  return token\n"
  "end\n"
  "local n = #KEYS / 2\n"
  "local r = {}\n"
  "for i = 1, n do\n"
  "  local k = KEYS[i]\n"
  "  local ok, t = true, 0\n"
  "  if redis.call('SET', k, ARGV[1], 'NX', 'PX', ARGV[2]) then\n"
  "    ok, t = pcall(next_token, KEYS[n + i])\n"
  "  elseif redis.call('GET', k) == ARGV[1] then\n"
  "    redis.call('PEXPIRE', k, ARGV[2])\n"
  "    ok, t = pcall(redis.call, 'GET', KEYS[n + i])\n"
  "    if ok and not t then ok, t = pcall(next_token, KEYS[n + i]) end\n"
  "  end\n"
  "  t = ok and tonumber(t) or nil\n"
  "  if t == nil then redis.call('DEL', k) t = 0 end\n"
  "  r[i] = t\n"
  "end\n"
  "return r\n";

/* Compare-and-renew: as script_acquire, but never takes a free lease. */
static const char script_renew[] =
  "local r = {}\n"
  "for i, k in ipairs(KEYS) do\n"
  "  if redis.call('GET', k) == ARGV[1] then redis.call('PEXPIRE', k, ARGV[2]) r[i] = 1\n"
  "  else r[i] = 0 end\n"
  "end\n"
  "return r\n";

/* Compare-and-delete: drops the leases this member holds. */
static const char script_release[] =
  "local n = 0\n"
  "for i, k in ipairs(KEYS) do\n"
  "  if redis.call('GET', k) == ARGV[1] then redis.call('DEL', k) n = n + 1 end\n"
  "end\n"
  "return n\n";

/* Where a group stands on each stream: the id of the last entry delivered
 * to it ("0-0" if none). KEYS: the streams; ARGV[1] the group. Run in the
 * MULTI of a read, right after XREADGROUP ">", for XREAD to wait for the
 * entries after it. */
static const char script_delivered_ids[] =
  "local r = {}\n"
  "for i, s in ipairs(KEYS) do\n"
  "  r[i] = '0-0'\n"
  "  for _, g in ipairs(redis.call('XINFO', 'GROUPS', s)) do\n"
  "    local f = {}\n"
  "    for j = 1, #g, 2 do f[g[j]] = g[j + 1] end\n"
  "    if f['name'] == ARGV[1] then r[i] = f['last-delivered-id'] end\n"
  "  end\n"
  "end\n"
  "return r\n";

/* Takes over pending entries while the lease is held. KEYS[1] lease,
 * KEYS[2] stream; ARGV[1] this member, ARGV[2] the group, ARGV[3] the
 * least idle time (ms), ARGV[4] the cursor, ARGV[5] how many, ARGV[6] "1"
 * if leased. XAUTOCLAIM's reply, or 0 if the lease is not ours. */
static const char script_claim[] =
  "if ARGV[6] == '1' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end\n"
  "return redis.call('XAUTOCLAIM', KEYS[2], ARGV[2], ARGV[1], ARGV[3], ARGV[4], 'COUNT', ARGV[5])\n";

/* Dead-letters an entry and acknowledges it, in one step. Run in a
 * transaction fenced by the shard's lease (see kd-redis-consumer.c).
 * KEYS[1] the stream, KEYS[2] the dead-letter stream; ARGV[1] the group,
 * ARGV[2] the id, ARGV[3] "1" if keyed, ARGV[4] key, ARGV[5] payload,
 * ARGV[6] producer, ARGV[7] sequence, ARGV[8] attempts, ARGV[9] the error.
 * Once only: an entry no longer pending (the reply was lost and this is a
 * retry) is not added again. 1, or 0 if it was not pending. */
static const char script_dead[] =
  "local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])\n"
  "if n == 1 then\n"
  "  local f = {'stream', KEYS[1], 'id', ARGV[2]}\n"
  "  if ARGV[3] == '1' then f[#f + 1] = 'k' f[#f + 1] = ARGV[4] end\n"
  "  for _, v in ipairs({'p', ARGV[5], 'pid', ARGV[6], 'seq', ARGV[7], 'attempts', ARGV[8], 'error', ARGV[9]}) do\n"
  "    f[#f + 1] = v\n"
  "  end\n"
  "  redis.call('XADD', KEYS[2], '*', unpack(f))\n"
  "end\n"
  "return n\n";

/* How many of the queue's jobs are unfinished: pending (read and not
 * acknowledged) or not yet read by the group. KEYS: the streams; ARGV[1]
 * the group. Redis may not know the lag of a group (after a restart from
 * the AOF): the entries after the last one delivered are counted then. A
 * key that is not a stream (one the consumers set aside) holds no job. */
static const char script_backlog[] =
  "local n = 0\n"
  "for _, s in ipairs(KEYS) do\n"
  "  local groups = {}\n"
  "  if redis.call('TYPE', s).ok == 'stream' then groups = redis.call('XINFO', 'GROUPS', s) end\n"
  "  for _, g in ipairs(groups) do\n"
  "    local f = {}\n"
  "    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end\n"
  "    if f['name'] == ARGV[1] then\n"
  "      n = n + f['pending']\n"
  "      if f['lag'] then n = n + f['lag']\n"
  "      else n = n + #redis.call('XRANGE', s, '(' .. f['last-delivered-id'], '+') end\n"
  "    end\n"
  "  end\n"
  "end\n"
  "return n\n";

/* Trims each stream below what every one of its consumer groups has
 * acknowledged, never further: a group's bound is its oldest pending entry
 * (read, not acknowledged), or, with none pending, the entry after the
 * last one it was delivered (the ones after it are not read yet). XTRIM
 * MINID removes the entries before the lowest bound. KEYS: the streams (a
 * key that is not one, set aside by the consumers, is left alone).
 * Returns how many entries were removed. */
static const char script_trim[] =
  "local function parse(id)\n"
  "  local ms, seq = string.match(id, '^(%d+)-(%d+)$')\n"
  "  return tonumber(ms), tonumber(seq)\n"
  "end\n"
  "local trimmed = 0\n"
  "for _, s in ipairs(KEYS) do\n"
  "  local min_ms, min_seq\n"
  "  local groups = {}\n"
  "  if redis.call('TYPE', s).ok == 'stream' then groups = redis.call('XINFO', 'GROUPS', s) end\n"
  "  for _, g in ipairs(groups) do\n"
  "    local f = {}\n"
  "    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end\n"
  "    local ms, seq\n"
  "    if f['pending'] > 0 then\n"
  "      ms, seq = parse(redis.call('XPENDING', s, f['name'])[2])\n"
  "    else\n"
  "      ms, seq = parse(f['last-delivered-id'])\n"
  "      seq = seq + 1\n"
  "    end\n"
  "    if min_ms == nil or ms < min_ms or (ms == min_ms and seq < min_seq) then\n"
  "      min_ms, min_seq = ms, seq\n"
  "    end\n"
  "  end\n"
  "  if min_ms ~= nil then\n"
  "    trimmed = trimmed + redis.call('XTRIM', s, 'MINID', string.format('%.0f-%.0f', min_ms, min_seq))\n"
  "  end\n"
  "end\n"
  "return trimmed\n";

/* Deletes from the group of each stream the consumers that are gone: not
 * among the live members (ARGV[3...], the members that beat within a lease
 * time, as the heartbeat listed them), idle for longer than ARGV[2] ms,
 * and holding no pending entry (XGROUP DELCONSUMER drops a consumer's
 * pending entries with it: those are left for a takeover to claim first).
 * KEYS: the streams (of one slot on a cluster); ARGV[1] the group. A
 * stream Redis refuses (a key of another type since the round began) is
 * passed over, not the others. Returns how many were deleted. */
static const char script_forget[] =
  "local live = {}\n"
  "for i = 3, #ARGV do live[ARGV[i]] = true end\n"
  "local n = 0\n"
  "for _, s in ipairs(KEYS) do\n"
  "  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', s, ARGV[1])\n"
  "  if not ok then consumers = {} end\n"
  "  for _, c in ipairs(consumers) do\n"
  "    local f = {}\n"
  "    for j = 1, #c, 2 do f[c[j]] = c[j + 1] end\n"
  "    if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and not live[f['name']] then\n"
  "      redis.call('XGROUP', 'DELCONSUMER', s, ARGV[1], f['name'])\n"
  "      n = n + 1\n"
  "    end\n"
  "  end\n"
  "end\n"
  "return n\n";

static const char *const sources[KD_REDIS_N_SCRIPTS] = {
  [KD_REDIS_SCRIPT_HEARTBEAT] = script_heartbeat,
  [KD_REDIS_SCRIPT_ACQUIRE] = script_acquire,
  [KD_REDIS_SCRIPT_RENEW] = script_renew,
  [KD_REDIS_SCRIPT_RELEASE] = script_release,
  [KD_REDIS_SCRIPT_DELIVERED_IDS] = script_delivered_ids,
  [KD_REDIS_SCRIPT_CLAIM] = script_claim,
  [KD_REDIS_SCRIPT_DEAD] = script_dead,
  [KD_REDIS_SCRIPT_BACKLOG] = script_backlog,
  [KD_REDIS_SCRIPT_TRIM] = script_trim,
  [KD_REDIS_SCRIPT_FORGET] = script_forget,
};

const char *
kd_redis_script_source (KdRedisScript script)
{
  g_return_val_if_fail (script < G_N_ELEMENTS (sources), NULL);

  return sources[script];
}
