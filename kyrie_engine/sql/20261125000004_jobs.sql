-- The job queue: one table the app and Realtime read, and the state
-- transitions the engine calls, as functions in the private schema.
--
--            enqueue_job                claim_jobs
--   (insert) ───────────► pending ──────────────────► running ── complete_job(s) ──► completed
--                            ▲  ▲                        │ │
--                            │  └── retry_later / release_jobs (attempt given back)
--                            └───── fail_job (backoff), reclaim_expired_leases ──┘ │
--                                        └──► failed (attempts exhausted or permanent)
--   cancel_job: pending|running ──► cancelled        retry_job: failed|cancelled ──► pending
--
-- Every transition checks the state it starts from in its WHERE clause, so a
-- late or duplicate call (a worker whose lease was taken over, a completion
-- retried after a lost connection) changes nothing and says so.  A running job
-- is fenced by (lease_owner, attempts): a worker may only finish the attempt it
-- claimed.  The engine connects as the table owner; none of these functions is
-- SECURITY DEFINER and none is executable by the API roles.

create table public.jobs (
  id               uuid primary key default gen_random_uuid(),
  -- Null for system jobs that belong to no workspace.
  workspace_id     uuid references public.workspaces (id) on delete cascade,
  -- Who asked; history survives the user.
  user_id          uuid references auth.users (id) on delete set null,
  kind             text not null check (kind ~ '^[a-z][a-z0-9_.:-]{0,99}$'),
  payload          jsonb not null default '{}'::jsonb,
  status           text not null default 'pending'
                   check (status in ('pending', 'running', 'completed', 'failed', 'cancelled')),
  result           jsonb,
  error            text,
  -- Higher runs first.
  priority         int not null default 0,
  run_at           timestamptz not null default now(),
  -- Attempts started so far: claim_jobs increments it, retry_later and
  -- release_jobs give it back.
  attempts         int not null default 0 check (attempts >= 0),
  max_attempts     int not null default 5 check (max_attempts between 1 and 1000),
  -- Times the job was sent back by retry_later (a rate limit): no attempt
  -- used, but capped there, so no job is deferred forever.
  deferrals        int not null default 0 check (deferrals >= 0),
  lease_owner      text,
  lease_expires_at timestamptz,
  idempotency_key  text check (length(idempotency_key) between 1 and 200),
  progress         jsonb,
  usage            jsonb not null default '{}'::jsonb,
  created_at       timestamptz not null default now(),
  updated_at       timestamptz not null default now(),
  started_at       timestamptz,
  finished_at      timestamptz,
  -- A running job always has somebody responsible for it and a deadline, and
  -- only a running job has them: so `lease_owner = me` alone means "running,
  -- and mine", which is how the transitions below fence (see complete_jobs).
  check ((status = 'running') = (lease_owner is not null)),
  check ((lease_owner is null) = (lease_expires_at is null)),
  check ((status in ('completed', 'failed', 'cancelled')) = (finished_at is not null))
);
alter table public.jobs enable row level security;

comment on table public.jobs is
  'Durable jobs of the engine. Written only through the kyrie.* queue functions; members read their workspace''s.';

-- The claim path: claim_jobs asks, per kind, for the first due pending jobs in
-- (priority desc, run_at) order.  Partial, so the index holds only the
-- (small) pending set however long the history grows; kind first because a
-- worker claims per kind (its handlers, its per-kind limits).
create index jobs_claim_idx on public.jobs (kind, priority desc, run_at) where status = 'pending';
-- Expired leases (reclaim), running counts for per-kind limits and the
-- running_jobs view: the running set is bounded by the workers' concurrency.
create index jobs_running_lease_idx on public.jobs (lease_expires_at) where status = 'running';
-- Foreign keys, and the column the read policy filters on.
create index jobs_workspace_id_idx on public.jobs (workspace_id, created_at desc);
create index jobs_user_id_idx on public.jobs (user_id);
-- Idempotency: one job per (workspace, kind, key).  NULLS NOT DISTINCT so a
-- system job's key (workspace_id null) is unique too.
create unique index jobs_idempotency_key_idx on public.jobs (workspace_id, kind, idempotency_key)
  nulls not distinct where idempotency_key is not null;
-- The recent_failures view.
create index jobs_failed_idx on public.jobs (finished_at desc) where status = 'failed';

-- Replica identity stays DEFAULT (the primary key), deliberately.  Supabase
-- Realtime and any logical-decoding follower get the whole new row of an
-- UPDATE either way; FULL would add the old row to the WAL record of every
-- claim, heartbeat and completion (the queue's hot path, payload included),
-- and Realtime sends only the primary key of the old record of a table with
-- RLS anyway.
alter table public.jobs replica identity default;

-- ---------------------------------------------------------------------------
-- Who may see what.  Members read their workspace's jobs (the app shows
-- progress and results); nobody but the engine (the owner) writes; anon
-- nothing.  System jobs (workspace_id null) are visible to no API role.

revoke all on public.jobs from public, anon, authenticated, service_role;
grant select on public.jobs to authenticated, service_role;

create policy jobs_select_member on public.jobs
  for select to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()));

-- Realtime: followers of a job see its row change.  Guarded so re-running
-- is safe, and so a FOR ALL TABLES publication (which already has it) works.
do $$
begin
  if exists (select from pg_publication where pubname = 'supabase_realtime' and not puballtables)
     and not exists (
       select from pg_publication_tables
       where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'jobs'
     ) then
    alter publication supabase_realtime add table public.jobs;
  end if;
end
$$;

-- ---------------------------------------------------------------------------
-- Per-kind limits across all workers (a worker's own limits are its
-- configuration).  A kind without a row is limited only by the workers.

create table kyrie.job_kind_limits (
  kind        text primary key,
  max_running int not null check (max_running >= 1)
);
revoke all on kyrie.job_kind_limits from public;
comment on table kyrie.job_kind_limits is
  'Cluster-wide cap on running jobs per kind, enforced by kyrie.claim_jobs (e.g. a model''s rate limit).';

-- ---------------------------------------------------------------------------
-- Notifications.  They only wake and inform; the row is the truth, so a lost
-- notification delays (until the workers' poll) and never loses a job.

-- kyrie_jobs: "new work".  Statement-level, with a constant payload:
-- PostgreSQL folds identical notifications of one transaction into one, so a
-- transaction that enqueues any number of jobs sends exactly one.
--
-- But a transaction that notifies holds a cluster-wide lock from just before
-- its commit until after the commit record is flushed, so concurrent
-- enqueuing transactions that each notify commit one at a time and lose
-- group commit (measured: 50 connections enqueue ~2.5x slower).  A caller
-- that enqueues in a transaction of its own (queue.enqueue on a pool, or on
-- a connection outside a transaction) therefore passes p_notify => false and
-- calls kyrie.wake_workers() once the insert has committed; concurrent
-- callers of one process share that call.  Any other insert (a caller's
-- larger transaction, psql) notifies here at its commit.
create or replace function kyrie.notify_jobs_inserted() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if current_setting('kyrie.wake_after_commit', true) is distinct from 'on' then
    perform pg_notify('kyrie_jobs', '');
  end if;
  return null;
end
$$;

create or replace function kyrie.wake_workers() returns void
language sql
set search_path = ''
as $$
  select pg_notify('kyrie_jobs', '')
$$;

create trigger jobs_notify_inserted after insert on public.jobs
  for each statement execute function kyrie.notify_jobs_inserted();

-- kyrie_job_events: {"id", "status"} when a job's status or progress
-- changes; followers (SSE, workers watching for cancels) re-read the row.
-- A worker also treats "pending" as "new work" (a retry, a handed-back job).
create or replace function kyrie.notify_job_event() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_notify('kyrie_job_events', jsonb_build_object('id', new.id, 'status', new.status)::text);
  return null;
end
$$;

create trigger jobs_notify_event after update of status, progress on public.jobs
  for each row
  when (old.status is distinct from new.status or old.progress is distinct from new.progress)
  execute function kyrie.notify_job_event();

-- updated_at is set by each transition below rather than by a row trigger:
-- only these functions write the table, and the hot path is cheaper without
-- a trigger call per row.

-- ---------------------------------------------------------------------------
-- enqueue

-- One job.  With an idempotency key, the same (workspace, kind, key) returns
-- the existing job with created = false, even under concurrent callers: ON
-- CONFLICT waits for an in-flight insert of the same key, and the lookup that
-- follows is a new statement, so it sees that insert once committed.
create or replace function kyrie.enqueue_job(
  p_kind            text,
  p_payload         jsonb default '{}'::jsonb,
  p_workspace_id    uuid default null,
  p_user_id         uuid default null,
  p_idempotency_key text default null,
  p_priority        int default 0,
  p_run_at          timestamptz default null,
  p_max_attempts    int default null,
  p_notify          boolean default true
) returns table (id uuid, created boolean)
language plpgsql
set search_path = ''
as $$
declare
  v_id uuid;
begin
  if not p_notify then
    -- Transaction-local: the caller's own transaction ends with this call.
    perform set_config('kyrie.wake_after_commit', 'on', true);
  end if;
  loop
    insert into public.jobs as j (kind, payload, workspace_id, user_id, idempotency_key,
                                  priority, run_at, max_attempts)
    values (p_kind, coalesce(p_payload, '{}'::jsonb), p_workspace_id, p_user_id, p_idempotency_key,
            coalesce(p_priority, 0), coalesce(p_run_at, now()), coalesce(p_max_attempts, 5))
    on conflict (workspace_id, kind, idempotency_key) where idempotency_key is not null do nothing
    returning j.id into v_id;
    if v_id is not null then
      return query select v_id, true;
      return;
    end if;

    -- Two spellings so each uses jobs_idempotency_key_idx (IS NOT DISTINCT FROM cannot).
    if p_workspace_id is null then
      select j.id into v_id from public.jobs j
      where j.workspace_id is null and j.kind = p_kind and j.idempotency_key = p_idempotency_key;
    else
      select j.id into v_id from public.jobs j
      where j.workspace_id = p_workspace_id and j.kind = p_kind and j.idempotency_key = p_idempotency_key;
    end if;
    if v_id is not null then
      return query select v_id, false;
      return;
    end if;
    -- The job that held the key was deleted in between: insert again.
  end loop;
end
$$;

-- Many jobs of one kind in one statement (one notification, one commit).
create or replace function kyrie.enqueue_jobs(
  p_kind         text,
  p_payloads     jsonb[],
  p_workspace_id uuid default null,
  p_user_id      uuid default null,
  p_priority     int default 0,
  p_run_at       timestamptz default null,
  p_max_attempts int default null,
  p_notify       boolean default true
) returns setof uuid
language plpgsql
set search_path = ''
as $$
begin
  if not p_notify then
    perform set_config('kyrie.wake_after_commit', 'on', true);
  end if;
  return query
  insert into public.jobs (kind, payload, workspace_id, user_id, priority, run_at, max_attempts)
  select p_kind, coalesce(p.payload, '{}'::jsonb), p_workspace_id, p_user_id,
         coalesce(p_priority, 0), coalesce(p_run_at, now()), coalesce(p_max_attempts, 5)
  from unnest(p_payloads) with ordinality as p (payload, n)
  order by p.n
  returning id;
end
$$;

-- ---------------------------------------------------------------------------
-- claim

-- Claim up to p_limit due jobs for p_owner, at most p_room[i] of kind
-- p_kinds[i] (the worker's free slots per kind), and never more running jobs
-- of a kind than kyrie.job_kind_limits allows across all workers.
--
-- Lock order: first the job_kind_limits rows of the kinds asked for (sorted by
-- kind, so two claimers cannot deadlock), then job rows.  Only claimers lock
-- limit rows, so claims of one limited kind run one at a time, which is what
-- makes the running count below exact; unlimited kinds never wait.  The count
-- is a new statement, so it sees the running jobs the previous holder of the
-- lock committed.
--
-- Each kind is a LATERAL index scan of jobs_claim_idx in (priority desc,
-- run_at) order with FOR UPDATE SKIP LOCKED: concurrent claimers pass over
-- each other's rows instead of queueing behind them.  Rows locked for a kind
-- but cut by the final LIMIT stay pending and are unlocked at commit.
create or replace function kyrie.claim_jobs(
  p_owner         text,
  p_kinds         text[],
  p_room          int[],
  p_limit         int,
  p_lease_seconds double precision
) returns table (
  id           uuid,
  kind         text,
  payload      jsonb,
  workspace_id uuid,
  user_id      uuid,
  attempt      int,
  max_attempts int
)
language plpgsql
set search_path = ''
as $$
begin
  perform 1 from kyrie.job_kind_limits l where l.kind = any (p_kinds) order by l.kind for update;

  return query
  with room as (
    select k.kind,
           case when l.kind is null then k.room
                else least(k.room, l.max_running - (
                  select count(*)::int from public.jobs r where r.status = 'running' and r.kind = k.kind))
           end as room
    from unnest(p_kinds, p_room) as k (kind, room)
    left join kyrie.job_kind_limits l on l.kind = k.kind
  ),
  picked as (
    select c.id, c.priority, c.run_at
    from room
    cross join lateral (
      select j.id, j.priority, j.run_at
      from public.jobs j
      where j.status = 'pending' and j.kind = room.kind and j.run_at <= now()
      order by j.priority desc, j.run_at
      limit greatest(room.room, 0)
      for update skip locked
    ) c
    order by c.priority desc, c.run_at
    limit greatest(p_limit, 0)
  ),
  -- `= any(array(...))`: primary-key lookups of the picked rows, whatever the
  -- (stale) statistics of a table whose rows change state every millisecond
  -- would otherwise suggest (a hash join over the whole table).
  claimed as (
    update public.jobs j
    set status = 'running',
        attempts = j.attempts + 1,
        lease_owner = p_owner,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        started_at = now(),
        updated_at = now()
    where j.id = any (array(select picked.id from picked))
    returning j.id, j.kind, j.payload, j.workspace_id, j.user_id, j.attempts, j.max_attempts,
              j.priority, j.run_at
  )
  -- UPDATE ... RETURNING has no order; hand the batch back in claim order.
  select c.id, c.kind, c.payload, c.workspace_id, c.user_id, c.attempts, c.max_attempts
  from claimed c
  order by c.priority desc, c.run_at;
end
$$;

-- ---------------------------------------------------------------------------
-- while running

-- Extend the leases of a worker's running jobs in one statement.  Returns the
-- ids still held: a job missing from the answer was cancelled or taken over,
-- and the worker stops its handler.
create or replace function kyrie.heartbeat_jobs(
  p_owner         text,
  p_ids           uuid[],
  p_attempts      int[],
  p_lease_seconds double precision
) returns setof uuid
language sql
set search_path = ''
as $$
  update public.jobs j
  set lease_expires_at = now() + make_interval(secs => p_lease_seconds),
      updated_at = now()
  from unnest(p_ids, p_attempts) as h (id, attempt)
  where j.id = h.id and j.lease_owner = p_owner and j.attempts = h.attempt
  returning j.id
$$;

create or replace function kyrie.set_job_progress(
  p_id       uuid,
  p_owner    text,
  p_attempt  int,
  p_progress jsonb
) returns boolean
language sql
set search_path = ''
as $$
  with done as (
    update public.jobs j
    set progress = p_progress, updated_at = now()
    where j.id = p_id and j.lease_owner = p_owner and j.attempts = p_attempt
    returning 1
  )
  select exists (select from done)
$$;

-- ---------------------------------------------------------------------------
-- outcomes

-- One job, inside the caller's transaction (a handler writes its own rows and
-- completes its job atomically).  False when the attempt is no longer held.
-- The error of an earlier attempt is cleared: `error` describes why a job is
-- failed, cancelled or retrying, never a job that succeeded.
create or replace function kyrie.complete_job(
  p_id      uuid,
  p_owner   text,
  p_attempt int,
  p_result  jsonb,
  p_usage   jsonb default null
) returns boolean
language sql
set search_path = ''
as $$
  with done as (
    update public.jobs j
    set status = 'completed', result = p_result, usage = coalesce(p_usage, j.usage), error = null,
        lease_owner = null, lease_expires_at = null, finished_at = now(), updated_at = now()
    where j.id = p_id and j.lease_owner = p_owner and j.attempts = p_attempt
    returning 1
  )
  select exists (select from done)
$$;

-- Many jobs of one worker, one statement: the worker buffers completions and
-- flushes them together.  Returns the ids completed; the others were no
-- longer held (cancelled, taken over, or completed by the handler itself).
--
-- Fenced by lease_owner, not by status (the check on the table makes them
-- equivalent): a `status = 'running'` here would let the planner drive the
-- join from jobs_running_lease_idx, whose row estimate is stale by nature
-- (one running row, says ANALYZE, when thousands are), and compare every
-- running job with every id of the batch.  Without it, each id of the batch
-- is one primary-key lookup.  The same holds for every fenced transition.
create or replace function kyrie.complete_jobs(
  p_owner    text,
  p_ids      uuid[],
  p_attempts int[],
  p_results  jsonb[]
) returns setof uuid
language sql
set search_path = ''
as $$
  update public.jobs j
  set status = 'completed', result = c.result, error = null,
      lease_owner = null, lease_expires_at = null, finished_at = now(), updated_at = now()
  from unnest(p_ids, p_attempts, p_results) as c (id, attempt, result)
  where j.id = c.id and j.lease_owner = p_owner and j.attempts = c.attempt
  returning j.id
$$;

-- The delay before attempt n+1 after n failed attempts: exponential, capped,
-- with "equal jitter" (half fixed, half random), so retries of many jobs that
-- failed together spread out while each job's delays still grow.
create or replace function kyrie.retry_delay(
  p_attempts     int,
  p_base_seconds double precision,
  p_cap_seconds  double precision
) returns interval
language sql
volatile
set search_path = ''
as $$
  with d as (
    select least(p_cap_seconds, p_base_seconds * power(2::double precision, greatest(p_attempts - 1, 0))) as s
  )
  select make_interval(secs => d.s / 2 + random() * d.s / 2) from d
$$;

-- A handler raised.  Retry later with backoff while attempts remain (the error
-- is kept on the pending row so operators see why it is retrying), else, or
-- when p_retry is false (a permanent failure), end as failed with the error.
-- Returns the job as it now is, or nothing when the attempt is not held.
create or replace function kyrie.fail_job(
  p_id           uuid,
  p_owner        text,
  p_attempt      int,
  p_error        text,
  p_retry        boolean default true,
  p_base_seconds double precision default 2,
  p_cap_seconds  double precision default 3600
) returns setof public.jobs
language sql
set search_path = ''
as $$
  update public.jobs j
  set status = case when p_retry and j.attempts < j.max_attempts then 'pending' else 'failed' end,
      run_at = case when p_retry and j.attempts < j.max_attempts
                    then now() + kyrie.retry_delay(j.attempts, p_base_seconds, p_cap_seconds)
                    else j.run_at end,
      finished_at = case when p_retry and j.attempts < j.max_attempts then null else now() end,
      error = left(p_error, 10000),
      lease_owner = null, lease_expires_at = null, updated_at = now()
  where j.id = p_id and j.lease_owner = p_owner and j.attempts = p_attempt
  returning j.*
$$;

-- The handler asked to run again later (a rate limit, a dependency not
-- ready): back to pending at now + delay, and the attempt does not count.
-- Deferrals are counted and capped: a job whose provider never stops saying
-- "later" (a revoked quota) fails after p_max_deferrals, with the reason,
-- instead of circling forever without ever using an attempt.  Returns the
-- job's new status ('pending' or 'failed'), or null when this attempt no
-- longer holds the job.  (In SET, j.* are the row's values before the update.)
create or replace function kyrie.retry_later(
  p_id            uuid,
  p_owner         text,
  p_attempt       int,
  p_delay_seconds double precision,
  p_reason        text default null,
  p_max_deferrals int default 100
) returns text
language sql
set search_path = ''
as $$
  update public.jobs j
  set deferrals = j.deferrals + 1,
      status = case when j.deferrals < p_max_deferrals then 'pending' else 'failed' end,
      attempts = case when j.deferrals < p_max_deferrals then j.attempts - 1 else j.attempts end,
      run_at = case when j.deferrals < p_max_deferrals
                    then now() + make_interval(secs => greatest(p_delay_seconds, 0))
                    else j.run_at end,
      error = case when j.deferrals < p_max_deferrals then j.error
                   else format('deferred %s times without finishing; the last reason: %s',
                               j.deferrals + 1, coalesce(p_reason, 'the handler asked to retry later')) end,
      finished_at = case when j.deferrals < p_max_deferrals then null else now() end,
      lease_owner = null, lease_expires_at = null, updated_at = now()
  where j.id = p_id and j.lease_owner = p_owner and j.attempts = p_attempt
  returning j.status
$$;

-- A stopping worker hands back what it could not finish: pending, due now,
-- and the attempt does not count (the job did not fail; the worker left).
create or replace function kyrie.release_jobs(
  p_owner    text,
  p_ids      uuid[],
  p_attempts int[]
) returns setof uuid
language sql
set search_path = ''
as $$
  update public.jobs j
  set status = 'pending', attempts = j.attempts - 1, run_at = now(),
      lease_owner = null, lease_expires_at = null, updated_at = now()
  from unnest(p_ids, p_attempts) as r (id, attempt)
  where j.id = r.id and j.lease_owner = p_owner and j.attempts = r.attempt
  returning j.id
$$;

-- Jobs whose worker died (no heartbeat before the lease ran out) go back to
-- pending; the attempt it started counts, so a job that kills its worker every
-- time ends as failed after max_attempts.  SKIP LOCKED: every worker calls
-- this on its poll, and none waits for another doing the same.
create or replace function kyrie.reclaim_expired_leases() returns setof public.jobs
language sql
set search_path = ''
as $$
  with expired as (
    select j.id
    from public.jobs j
    where j.status = 'running' and j.lease_expires_at < now()
    for update skip locked
  )
  update public.jobs j
  set status = case when j.attempts < j.max_attempts then 'pending' else 'failed' end,
      finished_at = case when j.attempts < j.max_attempts then null else now() end,
      run_at = now(),
      error = format('lease of %s expired at %s (worker lost) on attempt %s of %s',
                     j.lease_owner, j.lease_expires_at, j.attempts, j.max_attempts),
      lease_owner = null, lease_expires_at = null, updated_at = now()
  from expired
  where j.id = expired.id
  returning j.*
$$;

-- ---------------------------------------------------------------------------
-- operators (psql, `kyrie-engine jobs`, the API's cancel)

-- Pending or running -> cancelled.  A running job's worker hears it on
-- kyrie_job_events (or from its next heartbeat) and stops the handler; its
-- late completion is refused because the job is no longer running.  Returns
-- the job as it now is (unchanged when already finished), nothing if unknown.
create or replace function kyrie.cancel_job(p_id uuid, p_reason text default null) returns setof public.jobs
language plpgsql
set search_path = ''
as $$
begin
  return query
  update public.jobs j
  set status = 'cancelled',
      error = coalesce(p_reason, 'cancelled'),
      lease_owner = null, lease_expires_at = null, finished_at = now(), updated_at = now()
  where j.id = p_id and j.status in ('pending', 'running')
  returning j.*;
  if not found then
    return query select * from public.jobs j where j.id = p_id;
  end if;
end
$$;

-- Failed or cancelled -> pending with a fresh set of attempts, due now; a
-- pending job scheduled later is made due now.  Running and completed jobs
-- are returned unchanged.
create or replace function kyrie.retry_job(p_id uuid) returns setof public.jobs
language plpgsql
set search_path = ''
as $$
begin
  return query
  update public.jobs j
  set status = 'pending',
      attempts = case when j.status = 'pending' then j.attempts else 0 end,
      deferrals = case when j.status = 'pending' then j.deferrals else 0 end,
      run_at = now(), finished_at = null, result = null,
      updated_at = now()
  where j.id = p_id and j.status in ('failed', 'cancelled', 'pending')
  returning j.*;
  if not found then
    return query select * from public.jobs j where j.id = p_id;
  end if;
end
$$;

-- Delete finished jobs older than the given age; the table is history, and
-- history needs pruning somewhere.  Returns how many were deleted.
create or replace function kyrie.purge_jobs(p_older_than interval) returns bigint
language sql
set search_path = ''
as $$
  with gone as (
    delete from public.jobs j
    where j.status in ('completed', 'failed', 'cancelled') and j.finished_at < now() - p_older_than
    returning 1
  )
  select count(*) from gone
$$;

-- Queue health per kind: how many in each state, and how long the oldest due
-- job has waited (the number to alert on).  "scheduled" are pending jobs not
-- yet due (run_at in the future: scheduled or backing off).
create or replace view kyrie.queue_stats with (security_invoker = true) as
select j.kind,
       count(*) filter (where j.status = 'pending' and j.run_at <= now()) as pending,
       count(*) filter (where j.status = 'pending' and j.run_at > now())  as scheduled,
       count(*) filter (where j.status = 'running')                       as running,
       count(*) filter (where j.status = 'completed')                     as completed,
       count(*) filter (where j.status = 'failed')                        as failed,
       count(*) filter (where j.status = 'cancelled')                     as cancelled,
       now() - min(j.run_at) filter (where j.status = 'pending' and j.run_at <= now()) as oldest_pending_age
from public.jobs j
group by j.kind
order by j.kind;

create or replace view kyrie.running_jobs with (security_invoker = true) as
select j.id, j.kind, j.workspace_id, j.attempts as attempt, j.max_attempts, j.lease_owner,
       j.started_at, now() - j.started_at as running_for,
       j.lease_expires_at - now() as lease_left,
       j.progress
from public.jobs j
where j.status = 'running'
order by j.started_at;

-- Failures, latest first: jobs that ended failed, and pending jobs retrying
-- after an error (status says which).
create or replace view kyrie.recent_failures with (security_invoker = true) as
select j.id, j.kind, j.status, j.workspace_id, j.attempts, j.max_attempts, j.error,
       coalesce(j.finished_at, j.updated_at) as failed_at,
       case when j.status = 'pending' then j.run_at end as next_run_at
from public.jobs j
where j.status = 'failed' or (j.status = 'pending' and j.error is not null)
order by coalesce(j.finished_at, j.updated_at) desc;

revoke all on kyrie.queue_stats, kyrie.running_jobs, kyrie.recent_failures from public;

-- Engine-only: the API roles execute none of the queue's functions.
revoke execute on function
  kyrie.notify_jobs_inserted(),
  kyrie.notify_job_event(),
  kyrie.wake_workers(),
  kyrie.enqueue_job(text, jsonb, uuid, uuid, text, int, timestamptz, int, boolean),
  kyrie.enqueue_jobs(text, jsonb[], uuid, uuid, int, timestamptz, int, boolean),
  kyrie.claim_jobs(text, text[], int[], int, double precision),
  kyrie.heartbeat_jobs(text, uuid[], int[], double precision),
  kyrie.set_job_progress(uuid, text, int, jsonb),
  kyrie.complete_job(uuid, text, int, jsonb, jsonb),
  kyrie.complete_jobs(text, uuid[], int[], jsonb[]),
  kyrie.retry_delay(int, double precision, double precision),
  kyrie.fail_job(uuid, text, int, text, boolean, double precision, double precision),
  kyrie.retry_later(uuid, text, int, double precision, text, int),
  kyrie.release_jobs(text, uuid[], int[]),
  kyrie.reclaim_expired_leases(),
  kyrie.cancel_job(uuid, text),
  kyrie.retry_job(uuid),
  kyrie.purge_jobs(interval)
from public, anon, authenticated, service_role;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
