-- kyrie_job_events sent by the queue's batch functions themselves, not by a
-- statement trigger with transition tables.
--
-- The trigger of 20261201000202 kept a copy of every old and every new row
-- that an UPDATE of public.jobs touched (payload and result included), then
-- joined the two copies to find the rows whose status or progress changed.
-- It did that for every claim, completion and heartbeat: measured on a
-- 20,000-job drain, 7 to 14 µs of the database's ~78 µs per job, the same
-- for a worker and for the bare loop.  A transition table is kept whenever
-- such a trigger exists, whatever the trigger then decides, so the only way
-- to stop paying for it is not to have one.
--
-- Now:
--   - The batch functions, which know what they changed, announce it:
--     claim_jobs, complete_jobs, fail_jobs, retry_later_jobs, release_jobs
--     and reclaim_expired_leases.  Each is its former self, renamed
--     `*_unannounced` and unchanged, inside a wrapper of the old name that
--     announces the rows it returns (kyrie.announce_jobs: the same messages
--     as before, one per status, at most 150 ids each).
--   - Every other change of status or progress (cancel_job, retry_job,
--     set_job_progress, the single-job functions, an operator's UPDATE in
--     psql) is announced by a row trigger, one message per job, in the
--     one-job format:
--       {"id": "<uuid>", "status": "..."}
--     It fires only for UPDATEs that set status or progress (a heartbeat
--     sets neither), only when one of them changed, and not inside the
--     wrappers, which set `kyrie.announced` for their own duration.  A row
--     trigger whose WHEN is false costs its WHEN, nothing more.
--
-- `kyrie.announced` is a setting of the session, so a role that can update
-- public.jobs could silence its own updates' messages.  Only the engine's
-- owner can update public.jobs, and the messages are hints anyway: every
-- follower reads the row (see the notifier).

-- The messages of 20261201000202, for any set of jobs now in one status:
-- ids in order, 150 a message (about 5.7 kB, under NOTIFY's 8000 bytes).
create or replace function kyrie.announce_jobs(p_ids uuid[], p_status text) returns void
language plpgsql
set search_path = ''
as $$
declare
  ids uuid[] := array(select i from unnest(p_ids) as i order by i);
  chunk int := 150;
begin
  if cardinality(ids) = 1 then
    perform pg_notify('kyrie_job_events', jsonb_build_object('id', ids[1], 'status', p_status)::text);
  elsif cardinality(ids) > 1 then
    for i in 0 .. (cardinality(ids) - 1) / chunk loop
      perform pg_notify('kyrie_job_events', jsonb_build_object(
        'ids', ids[i * chunk + 1 : (i + 1) * chunk], 'status', p_status)::text);
    end loop;
  end if;
end
$$;

create or replace function kyrie.announce_job_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform pg_notify('kyrie_job_events', jsonb_build_object('id', new.id, 'status', new.status)::text);
  return null;
end
$$;

drop trigger jobs_notify_events on public.jobs;
drop function kyrie.notify_job_events();

create trigger jobs_announce_change after update of status, progress on public.jobs
  for each row
  when (current_setting('kyrie.announced', true) is distinct from 'on'
        and (old.status is distinct from new.status or old.progress is distinct from new.progress))
  execute function kyrie.announce_job_change();

-- ---------------------------------------------------------------------------
-- The batch functions, announced.  Renaming keeps each one's body, settings
-- (enable_seqscan, plan_cache_mode) and privileges; the wrappers take the
-- same arguments and return the same rows, in the same order.

alter function kyrie.claim_jobs(text, text[], int[], int, double precision)
  rename to claim_jobs_unannounced;
alter function kyrie.complete_jobs(text, uuid[], int[], jsonb[])
  rename to complete_jobs_unannounced;
alter function kyrie.fail_jobs(text, uuid[], int[], text[], text[], boolean[], double precision,
                               double precision)
  rename to fail_jobs_unannounced;
alter function kyrie.retry_later_jobs(text, uuid[], int[], double precision[], text[], int)
  rename to retry_later_jobs_unannounced;
alter function kyrie.release_jobs(text, uuid[], int[]) rename to release_jobs_unannounced;
alter function kyrie.reclaim_expired_leases() rename to reclaim_expired_leases_unannounced;

-- In each wrapper, `said` is one row (an aggregate without GROUP BY) that
-- the final SELECT reads, so it runs exactly once, after the change.
create function kyrie.claim_jobs(
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
language sql
set search_path = ''
set kyrie.announced = 'on'
as $$
  with claimed as materialized (
    select * from kyrie.claim_jobs_unannounced(p_owner, p_kinds, p_room, p_limit, p_lease_seconds)
      with ordinality as c (id, kind, payload, workspace_id, user_id, attempt, max_attempts, n)
  ),
  said as (select kyrie.announce_jobs(array_agg(c.id), 'running') from claimed c)
  select c.id, c.kind, c.payload, c.workspace_id, c.user_id, c.attempt, c.max_attempts
  from claimed c, said
  order by c.n  -- the claim's own order (priority, turn, age)
$$;

create function kyrie.complete_jobs(
  p_owner    text,
  p_ids      uuid[],
  p_attempts int[],
  p_results  jsonb[]
) returns setof uuid
language sql
set search_path = ''
set kyrie.announced = 'on'
as $$
  with done as materialized (
    select d.id from kyrie.complete_jobs_unannounced(p_owner, p_ids, p_attempts, p_results) as d (id)
  ),
  said as (select kyrie.announce_jobs(array_agg(d.id), 'completed') from done d)
  select d.id from done d, said
$$;

create function kyrie.fail_jobs(
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
set kyrie.announced = 'on'
as $$
  with failed as materialized (
    select * from kyrie.fail_jobs_unannounced(p_owner, p_ids, p_attempts, p_errors, p_details, p_retry,
                                              p_base_seconds, p_cap_seconds)
  ),
  said as (
    select kyrie.announce_jobs(array_agg(f.id) filter (where f.status = 'pending'), 'pending'),
           kyrie.announce_jobs(array_agg(f.id) filter (where f.status = 'failed'), 'failed')
    from failed f
  )
  select f.id, f.status from failed f, said
$$;

create function kyrie.retry_later_jobs(
  p_owner         text,
  p_ids           uuid[],
  p_attempts      int[],
  p_delays        double precision[],
  p_reasons       text[],
  p_max_deferrals int default 100
) returns table (id uuid, status text)
language sql
set search_path = ''
set kyrie.announced = 'on'
as $$
  with deferred as materialized (
    select * from kyrie.retry_later_jobs_unannounced(p_owner, p_ids, p_attempts, p_delays, p_reasons,
                                                     p_max_deferrals)
  ),
  said as (
    select kyrie.announce_jobs(array_agg(d.id) filter (where d.status = 'pending'), 'pending'),
           kyrie.announce_jobs(array_agg(d.id) filter (where d.status = 'failed'), 'failed')
    from deferred d
  )
  select d.id, d.status from deferred d, said
$$;

create function kyrie.release_jobs(
  p_owner    text,
  p_ids      uuid[],
  p_attempts int[]
) returns setof uuid
language sql
set search_path = ''
set kyrie.announced = 'on'
as $$
  with released as materialized (
    select r.id from kyrie.release_jobs_unannounced(p_owner, p_ids, p_attempts) as r (id)
  ),
  said as (select kyrie.announce_jobs(array_agg(r.id), 'pending') from released r)
  select r.id from released r, said
$$;

create function kyrie.reclaim_expired_leases() returns setof public.jobs
language sql
set search_path = ''
set kyrie.announced = 'on'
as $$
  with moved as materialized (select * from kyrie.reclaim_expired_leases_unannounced()),
  said as (
    select kyrie.announce_jobs(array_agg(m.id) filter (where m.status = 'pending'), 'pending'),
           kyrie.announce_jobs(array_agg(m.id) filter (where m.status = 'failed'), 'failed')
    from moved m
  )
  select m.* from moved m, said
$$;

revoke execute on function
  kyrie.announce_jobs(uuid[], text),
  kyrie.announce_job_change(),
  kyrie.claim_jobs(text, text[], int[], int, double precision),
  kyrie.complete_jobs(text, uuid[], int[], jsonb[]),
  kyrie.fail_jobs(text, uuid[], int[], text[], text[], boolean[], double precision, double precision),
  kyrie.retry_later_jobs(text, uuid[], int[], double precision[], text[], int),
  kyrie.release_jobs(text, uuid[], int[]),
  kyrie.reclaim_expired_leases()
from public, anon, authenticated, service_role;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants (see the foundation file).
revoke execute on all functions in schema kyrie from public;
