-- Fair shares between workspaces, and per-workspace caps, in kyrie.claim_jobs.
--
-- Why: claims followed (priority desc, run_at) only, so a workspace that
-- queued 200 analyses delayed every other workspace's single click behind
-- all 200.  Now, within a kind and a priority, the next free slot goes to
-- the workspace with the fewest jobs of that kind running (across all
-- workers) plus pending before it: its "turn".  A workspace with nothing
-- running is served at the next free slot, so one workspace's backlog delays
-- another's job by at most about one job's run time per free slot; between
-- workspaces with equal turns, the older job first.  Strict priority still
-- wins: a higher priority job goes before any turn.  Jobs without a
-- workspace (system jobs) take their turns as one group.

-- Optional: at most this many running jobs of a kind per workspace, across
-- all workers (e.g. one CFO analysis per workspace at a time).  A kind
-- without a row is capped per workspace only by kyrie.job_kind_limits and
-- the workers.  Operators write it from psql (README, "Fair shares").
create table kyrie.workspace_kind_limits (
  kind                      text primary key check (kind ~ '^[a-z][a-z0-9_.:-]{0,99}$'),
  max_running_per_workspace int not null check (max_running_per_workspace >= 1)
);
revoke all on kyrie.workspace_kind_limits from public;
comment on table kyrie.workspace_kind_limits is
  'Cap on running jobs of a kind per workspace, across all workers, enforced by kyrie.claim_jobs.';

-- The claim's one index: per kind, per workspace, in claim order.  It serves
-- the walk over the workspaces with pending jobs of a kind (one descent per
-- workspace) and each workspace's first few jobs.  It replaces
-- jobs_claim_idx (kind, priority desc, run_at), which nothing reads any more
-- and which every enqueue and claim would keep paying for.  Not
-- CONCURRENTLY: a migration is one transaction; the pending set it indexes
-- is small.
create index if not exists jobs_fair_claim_idx on public.jobs (kind, workspace_id, priority desc, run_at)
  where status = 'pending';
drop index if exists public.jobs_claim_idx;

-- Claim up to p_limit due jobs for p_owner, at most p_room[i] of kind
-- p_kinds[i], never more running jobs of a kind than kyrie.job_kind_limits
-- allows, nor of a kind in one workspace than kyrie.workspace_kind_limits
-- allows, across all workers; in fair order (above).  Same signature and
-- result as before, so workers of the previous release call it unchanged.
--
-- Lock order: the job_kind_limits rows of the kinds asked for, then their
-- workspace_kind_limits rows (each sorted by kind, so two claimers cannot
-- deadlock), then job rows.  Claimers of a limited kind therefore run one at
-- a time, which makes the running counts of the next statement exact (it is
-- a new statement, so it sees what the previous holder committed); kinds
-- without limits never wait.
--
-- Cost, bounded by the workspaces with pending jobs of a kind, never by the
-- pending jobs: the walk over those workspaces is a loose index scan
-- (PostgreSQL 15 has no skip scan of its own), and each workspace is a
-- LATERAL scan of its first `room` due jobs with FOR UPDATE SKIP LOCKED, so
-- concurrent claimers pass over each other's rows as before.  Rows locked
-- but not claimed stay pending and are unlocked at commit.  The running set
-- (bounded by the workers' concurrency) is read once for everyone's turns.
-- Measured (2,000 pending, one connection, PostgreSQL 15): one job per claim
-- costs ~0.5-0.8 ms more than the claim before (one workspace or none); 50
-- jobs over 50 workspaces ~3.5x (it reads and locks room x workspaces rows).
-- Bounding each workspace's share of that read is the next step if it shows.
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
  perform 1 from kyrie.workspace_kind_limits l where l.kind = any (p_kinds) order by l.kind for update;

  return query
  with recursive room as (
    select k.kind,
           case when l.kind is null then k.room
                else least(k.room, l.max_running - (
                  select count(*)::int from public.jobs r where r.status = 'running' and r.kind = k.kind))
           end as room,
           w.max_running_per_workspace as cap
    from unnest(p_kinds, p_room) as k (kind, room)
    left join kyrie.job_kind_limits l on l.kind = k.kind
    left join kyrie.workspace_kind_limits w on w.kind = k.kind
  ),
  -- What each workspace already runs, per kind, on any worker: its share.
  busy as (
    select r.kind, r.workspace_id, count(*)::int as n
    from public.jobs r
    where r.status = 'running' and r.kind = any (p_kinds)
    group by r.kind, r.workspace_id
  ),
  -- The workspaces with pending jobs of each kind: one index descent each.
  spaces (kind, workspace_id) as (
    select room.kind,
           (select j.workspace_id from public.jobs j
            where j.status = 'pending' and j.kind = room.kind and j.workspace_id is not null
            order by j.workspace_id limit 1)
    from room
    where room.room > 0
    union all
    select s.kind,
           (select j.workspace_id from public.jobs j
            where j.status = 'pending' and j.kind = s.kind and j.workspace_id > s.workspace_id
            order by j.workspace_id limit 1)
    from spaces s
    where s.workspace_id is not null
  ),
  -- Each workspace's first due jobs, as many as the kind has room for (less
  -- its cap's remainder), locked; and the same for jobs without a workspace.
  -- Two LATERALs rather than one with IS NOT DISTINCT FROM, which no index
  -- serves.
  in_spaces as (
    select c.id, c.priority, c.run_at, s.kind, s.workspace_id
    from spaces s
    join room on room.kind = s.kind
    left join busy b on b.kind = s.kind and b.workspace_id = s.workspace_id
    cross join lateral (
      select j.id, j.priority, j.run_at
      from public.jobs j
      where j.status = 'pending' and j.kind = s.kind and j.workspace_id = s.workspace_id
        and j.run_at <= now()
      order by j.priority desc, j.run_at
      limit greatest(least(room.room, coalesce(room.cap - coalesce(b.n, 0), room.room)), 0)
      for update skip locked
    ) c
    where s.workspace_id is not null
  ),
  in_none as (
    select c.id, c.priority, c.run_at, room.kind, null::uuid as workspace_id
    from room
    cross join lateral (
      select j.id, j.priority, j.run_at
      from public.jobs j
      where j.status = 'pending' and j.kind = room.kind and j.workspace_id is null and j.run_at <= now()
      order by j.priority desc, j.run_at
      limit greatest(room.room, 0)
      for update skip locked
    ) c
  ),
  -- A job's turn: its workspace's running jobs of the kind, plus its place
  -- among the workspace's candidates (higher priorities first: those are
  -- picked first, and then count as running jobs would).
  candidates as (
    select c.id, c.priority, c.run_at, c.kind,
           coalesce(b.n, 0)
             + row_number() over (partition by c.kind, c.workspace_id
                                  order by c.priority desc, c.run_at) as turn
    from (select * from in_spaces union all select * from in_none) c
    left join busy b on b.kind = c.kind and b.workspace_id is not distinct from c.workspace_id
  ),
  ranked as (
    select c.id, c.kind, c.priority, c.run_at, c.turn,
           row_number() over (partition by c.kind order by c.priority desc, c.turn, c.run_at) as nth,
           room.room
    from candidates c
    join room on room.kind = c.kind
  ),
  chosen as (
    select r.id, r.priority, r.run_at, r.turn
    from ranked r
    where r.nth <= r.room
    order by r.priority desc, r.turn, r.run_at
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
    where j.id = any (array(select chosen.id from chosen))
    returning j.id, j.kind, j.payload, j.workspace_id, j.user_id, j.attempts, j.max_attempts
  )
  -- UPDATE ... RETURNING has no order; hand the batch back in claim order.
  select c.id, c.kind, c.payload, c.workspace_id, c.user_id, c.attempts, c.max_attempts
  from claimed c
  join chosen p on p.id = c.id
  order by p.priority desc, p.turn, p.run_at;
end
$$;

revoke execute on function kyrie.claim_jobs(text, text[], int[], int, double precision)
  from public, anon, authenticated, service_role;
