-- The worker's batch statements touch their rows by primary key, whatever
-- the statistics say.
--
-- Why: the jobs table's statistics are stale by nature: its rows change state
-- every millisecond, and ANALYZE saw the table at some other moment (all
-- pending, or all completed).  complete_jobs and the other fenced batch
-- writes were planned from such statistics as "one row has lease_owner =
-- this worker": a scan of the whole table for that row, then every row found
-- compared with every id of the batch.  Measured on 20,000 jobs, 500
-- completions in one statement: 72 ms in that join, 86 ms in all; with one
-- primary-key lookup per id, 14 ms.  A scan would also grow with the table,
-- which keeps completed jobs for days.  `enable_seqscan = off`, set on the
-- function only (restored when it returns), leaves the planner one way in:
-- the indexes.  Nothing in these statements needs a scan of jobs.
alter function kyrie.complete_jobs(text, uuid[], int[], jsonb[]) set enable_seqscan = off;
alter function kyrie.fail_jobs(text, uuid[], int[], text[], text[], boolean[], double precision,
                               double precision) set enable_seqscan = off;
alter function kyrie.retry_later_jobs(text, uuid[], int[], double precision[], text[], int)
  set enable_seqscan = off;
alter function kyrie.release_jobs(text, uuid[], int[]) set enable_seqscan = off;
alter function kyrie.heartbeat_jobs(text, uuid[], int[], double precision) set enable_seqscan = off;

-- kyrie.claim_jobs as in 20261201000502_fair_claims.sql (the fairness rules
-- and the lock order are explained there), with three changes:
--
-- - Each workspace's candidates are ordered as jobs_fair_claim_idx is,
--   (kind, workspace_id, priority desc, run_at): within one LATERAL, kind and
--   workspace are fixed, so the order is the same, but now the planner sees
--   that the index already gives it.  Ordered by (priority desc, run_at)
--   alone, it read every pending job of the workspace (20,000 for jobs
--   without one) and sorted them, for each claim: 9.4 ms of a 125-job claim.
-- - `enable_seqscan = off`, for the reasons above.
-- - One plan, made once per connection (`force_generic_plan`).  A claim's
--   plan follows from the sizes of its CTEs, not from its arguments, so the
--   generic plan is the one its arguments would get; but plpgsql re-planned
--   the whole statement (a dozen CTEs) on every call: about 1.5 ms of a
--   2.3 ms one-job claim, most of a worker's pickup latency.
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
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
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
      order by j.kind, j.workspace_id, j.priority desc, j.run_at
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
      order by j.kind, j.workspace_id, j.priority desc, j.run_at
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
