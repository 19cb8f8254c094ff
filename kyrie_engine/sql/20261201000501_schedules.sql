-- Schedules: periodic jobs kept in the database, enqueued by every worker.
--
-- Division of labour: Python (kyrie_engine/schedules.py, with cronsim) reads
-- the cron expressions and computes slots; the database decides, under the
-- schedule's row lock, which worker's slot is enqueued.  So any number of
-- workers (and embedding programs) can run the scheduler without electing a
-- leader, and each slot becomes exactly one job.
--
-- Operators manage schedules with plain SQL (README, "Schedules"):
--   insert into kyrie.schedules (name, cron, kind) values ('nightly', '0 3 * * *', 'reports.nightly');
--   update kyrie.schedules set enabled = false where name = 'nightly';
--   delete from kyrie.schedules where name = 'nightly';
--   select * from kyrie.schedule_status;

-- ---------------------------------------------------------------------------
-- The database's idea of "now", for the scheduler.
--
-- One function the scheduler reads instead of now(), so a test can move time
-- for every connection at once: a session setting would move it only for the
-- session that set it, and ALTER DATABASE ... SET only for new connections.
-- The one-row table is written by tests only; empty (always, in production)
-- means the real clock.  Deliberately not used by the queue's transitions
-- (claim, backoff, leases): they keep now(), so a moved clock cannot make a
-- production worker run jobs early.
create table kyrie.clock (
  only_row  boolean primary key default true check (only_row),
  frozen_at timestamptz not null
);
revoke all on kyrie.clock from public;
comment on table kyrie.clock is
  'Tests only: when it has its one row, kyrie.now() returns frozen_at instead of now(). Empty in production.';

create or replace function kyrie.now() returns timestamptz
language sql
stable
set search_path = ''
as $$
  select coalesce((select c.frozen_at from kyrie.clock c), now())
$$;

-- ---------------------------------------------------------------------------
-- Time zone names as PostgreSQL knows them (the same IANA database Python's
-- zoneinfo reads), for the CHECK below.  Declared immutable so a CHECK may
-- call it: the answer for a name changes only with a tzdata upgrade, which
-- adds names and does not remove them.
create or replace function kyrie.is_time_zone(p_name text) returns boolean
language plpgsql
immutable
set search_path = ''
as $$
begin
  perform now() at time zone p_name;
  return true;
exception when invalid_parameter_value then
  return false;
end
$$;

create table kyrie.schedules (
  id           bigint generated always as identity primary key,
  name         text not null unique check (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
  -- Five fields (minute hour day-of-month month day-of-week); the full
  -- grammar is checked by `kyrie-engine schedules add` (cronsim), and a
  -- row written from psql with a field cronsim refuses is logged and skipped
  -- by every worker, never enqueued.
  cron         text not null check (cardinality(regexp_split_to_array(btrim(cron), '\s+')) = 5),
  -- Slots are computed in this zone: '0 7 * * 1' is 07:00 local time, across DST.
  timezone     text not null default 'UTC' check (kyrie.is_time_zone(timezone)),
  -- The jobs table's own rule for kinds.  A kind no worker handles is
  -- allowed: its worker may run elsewhere.
  kind         text not null check (kind ~ '^[a-z][a-z0-9_.:-]{0,99}$'),
  payload      jsonb not null default '{}'::jsonb check (jsonb_typeof(payload) = 'object'),
  workspace_id uuid references public.workspaces (id) on delete cascade,
  user_id      uuid references auth.users (id) on delete set null,
  priority     int not null default 0,
  enabled      boolean not null default true,
  -- The latest slot enqueued (null: none yet).  Slots only move forward: a
  -- slot at or before it is never enqueued, which is what makes "after a
  -- downtime, the latest missed slot runs once" hold however many workers
  -- come back at once.
  last_slot    timestamptz,
  -- The slot after last_slot as the last worker to look computed it: for
  -- the console and psql (kyrie.schedule_status); the scheduler recomputes it.
  next_run_at  timestamptz,
  -- Slots at or before this are not due: a new schedule does not run its
  -- latest past slot the moment it is added.
  created_at   timestamptz not null default kyrie.now(),
  updated_at   timestamptz not null default kyrie.now()
);
create index schedules_workspace_id_idx on kyrie.schedules (workspace_id);
create index schedules_user_id_idx on kyrie.schedules (user_id);
revoke all on kyrie.schedules from public;
comment on table kyrie.schedules is
  'Periodic jobs: each due slot of an enabled schedule becomes one job (run_at = the slot), enqueued by whichever worker gets there first.';

-- One row per slot enqueued: the unique key that makes a slot one job.
-- Its own table rather than the job's idempotency key: a key is scoped by
-- the job's (workspace, kind), which an operator may change on the schedule,
-- it belongs to the app's namespace, and it disappears when retention purges
-- the job, after which a late worker could enqueue that slot again.  These
-- rows outlive the jobs (job_id is history, not a foreign key) and name the
-- job each slot made; the last 100 per schedule are kept.
create table kyrie.schedule_runs (
  schedule_id bigint not null references kyrie.schedules (id) on delete cascade,
  slot        timestamptz not null,
  job_id      uuid not null,
  enqueued_at timestamptz not null default now(),
  primary key (schedule_id, slot)
);
revoke all on kyrie.schedule_runs from public;

-- Enqueue the job of one slot of a schedule, if nobody did: returns the new
-- job's id, or null when the slot is not due or not new (another worker got
-- there first, the schedule was disabled, edited or removed meanwhile).
--
-- The schedule's row lock orders the workers racing for a slot; the first
-- one moves last_slot forward, and the others, re-reading the row after the
-- lock, see a slot that is no longer after last_slot.  The schedule_runs
-- primary key says the same thing a second way: a bug upstream would raise
-- a unique violation instead of enqueuing a slot twice.  p_cron is the
-- expression (and p_timezone the zone) the caller computed the slot from: an edit of the row in
-- between makes the call a no-op (the next pass computes from the new one).
-- p_next is the slot after this one, for schedule_status.
create or replace function kyrie.enqueue_schedule_slot(
  p_schedule_id bigint,
  p_cron        text,
  p_timezone    text,
  p_slot        timestamptz,
  p_next        timestamptz
) returns uuid
language plpgsql
set search_path = ''
as $$
declare
  v_schedule kyrie.schedules;
  v_job      uuid;
begin
  select * into v_schedule from kyrie.schedules s
  where s.id = p_schedule_id
    and s.enabled
    and s.cron = p_cron
    and s.timezone = p_timezone
    and p_slot > coalesce(s.last_slot, s.created_at)
    and p_slot <= kyrie.now()
  for update;
  if not found then
    return null;
  end if;

  -- p_notify => true: the trigger's one notification at commit wakes the
  -- workers (a slot a minute is no load on the notification lock).
  select e.id into v_job
  from kyrie.enqueue_job(v_schedule.kind, v_schedule.payload, v_schedule.workspace_id,
                         v_schedule.user_id, null, v_schedule.priority, p_slot, null, true) e;
  insert into kyrie.schedule_runs (schedule_id, slot, job_id) values (p_schedule_id, p_slot, v_job);
  delete from kyrie.schedule_runs r
  where r.schedule_id = p_schedule_id
    and r.slot < (select o.slot from kyrie.schedule_runs o where o.schedule_id = p_schedule_id
                  order by o.slot desc offset 99 limit 1);
  update kyrie.schedules s
  set last_slot = p_slot, next_run_at = p_next, updated_at = kyrie.now()
  where s.id = p_schedule_id;
  return v_job;
end
$$;

-- The next slot as a worker computed it, for schedule_status: written only
-- when it changed (a new schedule, an edit), so a pass over unchanged
-- schedules writes nothing.  Same guard on the expression as above.
create or replace function kyrie.note_schedule_next(
  p_schedule_id bigint,
  p_cron        text,
  p_timezone    text,
  p_next        timestamptz
) returns void
language sql
set search_path = ''
as $$
  update kyrie.schedules s
  set next_run_at = p_next
  where s.id = p_schedule_id and s.cron = p_cron and s.timezone = p_timezone
    and s.next_run_at is distinct from p_next
$$;

-- What the console and psql show: one row per schedule, its latest slot
-- enqueued (with the job it made) and its next slot.
create or replace view kyrie.schedule_status with (security_invoker = true) as
select s.name, s.cron, s.timezone, s.kind, s.enabled, s.workspace_id,
       s.last_slot, r.job_id as last_job_id, s.next_run_at as next_slot
from kyrie.schedules s
left join kyrie.schedule_runs r on r.schedule_id = s.id and r.slot = s.last_slot
order by s.name;
revoke all on kyrie.schedule_status from public;

revoke execute on function
  kyrie.now(),
  kyrie.is_time_zone(text),
  kyrie.enqueue_schedule_slot(bigint, text, text, timestamptz, timestamptz),
  kyrie.note_schedule_next(bigint, text, text, timestamptz)
from public, anon, authenticated, service_role;
