-- What members see of a job's troubles, and what only operators see.
--
-- Members read public.jobs (RLS, Realtime, GET /ai/jobs/{id}).  It used to
-- carry tracebacks with absolute paths (sometimes a whole agent prompt) in
-- `error`, and `hostname:pid` in `lease_owner`.  Now:
--   - `jobs.error` is one line a person can act on (the worker writes it so);
--   - the detail of each attempt that did not complete (traceback, which
--     worker, when) is in kyrie.job_attempts, written by the same statement
--     that records the outcome, so the two cannot disagree;
--   - `lease_owner` is an opaque id; what it stands for (host, pid, start,
--     last heartbeat) is in kyrie.workers.
-- Both tables are in the private schema, readable by the owner and
-- service_role only (operators: psql, the CLI, the console).  Column
-- privileges on public.jobs were the other way, and are not used: PostgREST's
-- `select=*` names every column and would fail for members.
--
-- Batched outcomes: fail_jobs and retry_later_jobs take arrays (one unnest
-- statement per batch, like complete_jobs), so a worker writes a batch of
-- failures in one round trip instead of one per job.

create table kyrie.workers (
  id         text primary key,
  hostname   text not null,
  pid        int not null,
  kinds      text[] not null default '{}',
  started_at timestamptz not null default now(),
  last_seen  timestamptz not null default now()
);
comment on table kyrie.workers is
  'Workers by the opaque id they write in jobs.lease_owner; last_seen is their last heartbeat. Operators only.';

create table kyrie.job_attempts (
  id          bigint generated always as identity primary key,
  job_id      uuid not null references public.jobs (id) on delete cascade,
  attempt     int not null,
  worker      text,
  started_at  timestamptz,
  finished_at timestamptz not null default now(),
  -- Completions are not recorded here (the job row has their times, and
  -- the hot path stays one write per job); every other ending is.
  outcome     text not null check (outcome in ('failed', 'deferred', 'released', 'lost')),
  error       text,
  detail      text
);
-- A job's timeline (and the foreign key's index).
create index job_attempts_job_idx on kyrie.job_attempts (job_id, finished_at);
comment on table kyrie.job_attempts is
  'Attempts that did not complete, with the detail members must not see (tracebacks). Operators only.';

revoke all on kyrie.workers, kyrie.job_attempts from public, anon, authenticated, service_role;
grant select on kyrie.workers, kyrie.job_attempts to service_role;

-- A worker says who it is when it starts (again after a restart of the
-- server: it is an upsert).  Every start also forgets workers silent for a
-- week: one row per process start would otherwise pile up forever, and a
-- week is longer than any lease, so no running job still names one.
create or replace function kyrie.register_worker(
  p_id       text,
  p_hostname text,
  p_pid      int,
  p_kinds    text[]
) returns void
language sql
set search_path = ''
as $$
  delete from kyrie.workers w where w.last_seen < now() - interval '7 days';
  insert into kyrie.workers as w (id, hostname, pid, kinds)
  values (p_id, p_hostname, p_pid, coalesce(p_kinds, '{}'))
  on conflict (id) do update set hostname = excluded.hostname, pid = excluded.pid,
                                 kinds = excluded.kinds, last_seen = now()
$$;

-- The heartbeat also says the worker is alive (kyrie.workers.last_seen), in
-- the same statement: a worker holding nothing still heartbeats, so the
-- console can list live workers.
create or replace function kyrie.heartbeat_jobs(
  p_owner         text,
  p_ids           uuid[],
  p_attempts      int[],
  p_lease_seconds double precision
) returns setof uuid
language sql
set search_path = ''
as $$
  with seen as (
    update kyrie.workers w set last_seen = now() where w.id = p_owner
  )
  update public.jobs j
  set lease_expires_at = now() + make_interval(secs => p_lease_seconds),
      updated_at = now()
  from unnest(p_ids, p_attempts) as h (id, attempt)
  where j.id = h.id and j.lease_owner = p_owner and j.attempts = h.attempt
  returning j.id
$$;

-- Failed attempts of one worker, one statement: back to pending with backoff
-- while attempts remain and retry is asked for, else failed.  `error` (one
-- line) goes on the job; `detail` only to job_attempts.  Returns each job
-- written with its new status; attempts no longer held are left out.
-- Fenced by lease_owner, not status, for the planner's sake (see complete_jobs).
create or replace function kyrie.fail_jobs(
  p_owner        text,
  p_ids          uuid[],
  p_attempts     int[],
  p_errors       text[],
  p_details      text[],
  p_retry        boolean[],
  p_base_seconds double precision default 2,
  p_cap_seconds  double precision default 3600
) returns table (id uuid, status text)
language sql
set search_path = ''
as $$
  with failed as (
    update public.jobs j
    set status = case when f.retry and j.attempts < j.max_attempts then 'pending' else 'failed' end,
        run_at = case when f.retry and j.attempts < j.max_attempts
                      then now() + kyrie.retry_delay(j.attempts, p_base_seconds, p_cap_seconds)
                      else j.run_at end,
        finished_at = case when f.retry and j.attempts < j.max_attempts then null else now() end,
        error = left(f.error, 1000),
        lease_owner = null, lease_expires_at = null, updated_at = now()
    from unnest(p_ids, p_attempts, p_errors, p_details, p_retry) as f (id, attempt, error, detail, retry)
    where j.id = f.id and j.lease_owner = p_owner and j.attempts = f.attempt
    returning j.id, j.status, f.attempt, j.started_at, f.error, f.detail
  ),
  logged as (
    insert into kyrie.job_attempts (job_id, attempt, worker, started_at, outcome, error, detail)
    select f.id, f.attempt, p_owner, f.started_at, 'failed', left(f.error, 1000), f.detail
    from failed f
  )
  select f.id, f.status from failed f
$$;

-- Deferred attempts (RetryLater) of one worker, one statement; the rules of
-- kyrie.retry_later, per row: pending at now + delay with the attempt given
-- back, until the job has been deferred p_max_deferrals times, then failed
-- with the last reason.  (In SET, j.* are the row's values before the update.)
create or replace function kyrie.retry_later_jobs(
  p_owner         text,
  p_ids           uuid[],
  p_attempts      int[],
  p_delays        double precision[],
  p_reasons       text[],
  p_max_deferrals int default 100
) returns table (id uuid, status text)
language sql
set search_path = ''
as $$
  with deferred as (
    update public.jobs j
    set deferrals = j.deferrals + 1,
        status = case when j.deferrals < p_max_deferrals then 'pending' else 'failed' end,
        attempts = case when j.deferrals < p_max_deferrals then j.attempts - 1 else j.attempts end,
        run_at = case when j.deferrals < p_max_deferrals
                      then now() + make_interval(secs => greatest(d.delay, 0))
                      else j.run_at end,
        error = case when j.deferrals < p_max_deferrals then j.error
                     else left(format('deferred %s times without finishing; the last reason: %s',
                                      j.deferrals + 1, coalesce(d.reason, 'the handler asked to retry later')),
                               1000) end,
        finished_at = case when j.deferrals < p_max_deferrals then null else now() end,
        lease_owner = null, lease_expires_at = null, updated_at = now()
    from unnest(p_ids, p_attempts, p_delays, p_reasons) as d (id, attempt, delay, reason)
    where j.id = d.id and j.lease_owner = p_owner and j.attempts = d.attempt
    returning j.id, j.status, d.attempt, j.started_at, d.reason
  ),
  logged as (
    insert into kyrie.job_attempts (job_id, attempt, worker, started_at, outcome, error)
    select d.id, d.attempt, p_owner, d.started_at, 'deferred', left(d.reason, 1000)
    from deferred d
  )
  select d.id, d.status from deferred d
$$;

-- release_jobs as before, and the hand-back is recorded in the job's timeline.
create or replace function kyrie.release_jobs(
  p_owner    text,
  p_ids      uuid[],
  p_attempts int[]
) returns setof uuid
language sql
set search_path = ''
as $$
  with released as (
    update public.jobs j
    set status = 'pending', attempts = j.attempts - 1, run_at = now(),
        lease_owner = null, lease_expires_at = null, updated_at = now()
    from unnest(p_ids, p_attempts) as r (id, attempt)
    where j.id = r.id and j.lease_owner = p_owner and j.attempts = r.attempt
    returning j.id, r.attempt, j.started_at
  ),
  logged as (
    insert into kyrie.job_attempts (job_id, attempt, worker, started_at, outcome)
    select r.id, r.attempt, p_owner, r.started_at, 'released' from released r
  )
  select r.id from released r
$$;

-- reclaim_expired_leases as before, but the member-visible error no longer
-- names the worker (its id is in job_attempts, its host in kyrie.workers).
-- The old owner and expiry are read in `expired`, under the row lock:
-- RETURNING shows the row after the update, whose lease is cleared.
create or replace function kyrie.reclaim_expired_leases() returns setof public.jobs
language sql
set search_path = ''
as $$
  with expired as (
    select j.id, j.lease_owner, j.lease_expires_at
    from public.jobs j
    where j.status = 'running' and j.lease_expires_at < now()
    for update skip locked
  ),
  moved as (
    update public.jobs j
    set status = case when j.attempts < j.max_attempts then 'pending' else 'failed' end,
        finished_at = case when j.attempts < j.max_attempts then null else now() end,
        run_at = now(),
        error = format('the worker running attempt %s of %s stopped responding; %s',
                       j.attempts, j.max_attempts,
                       case when j.attempts < j.max_attempts then 'retrying' else 'no attempts left' end),
        lease_owner = null, lease_expires_at = null, updated_at = now()
    from expired
    where j.id = expired.id
    returning j.*
  ),
  logged as (
    insert into kyrie.job_attempts (job_id, attempt, worker, started_at, outcome, error, detail)
    select m.id, m.attempts, e.lease_owner, m.started_at, 'lost', m.error,
           format('lease of %s expired at %s', e.lease_owner, e.lease_expires_at)
    from moved m join expired e on e.id = m.id
  )
  select m.* from moved m
$$;

revoke execute on function
  kyrie.register_worker(text, text, int, text[]),
  kyrie.heartbeat_jobs(text, uuid[], int[], double precision),
  kyrie.fail_jobs(text, uuid[], int[], text[], text[], boolean[], double precision, double precision),
  kyrie.retry_later_jobs(text, uuid[], int[], double precision[], text[], int),
  kyrie.release_jobs(text, uuid[], int[]),
  kyrie.reclaim_expired_leases()
from public, anon, authenticated, service_role;

revoke execute on all functions in schema kyrie from public;
