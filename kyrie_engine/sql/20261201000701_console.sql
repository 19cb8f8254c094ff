-- The operator console's reads (kyrie_engine/console/queries.py), one function
-- per page section.  They run as the service's own connection (an operator's
-- view of every workspace, no RLS), so EXECUTE is revoked from everyone the
-- app's users can become.  Each is written to stay on an index on a table of
-- a million jobs (kyrie-engine bench --only console measures them):
--   - "now" counts read only the partial indexes of pending and running jobs;
--     failures are counted over the last day (the finished index), not over
--     the whole retained history, which may be months of rows;
--   - the charts read jobs finished since a time, through jobs_finished_idx
--     (status, finished_at) from migration 20261201000302.

-- Per kind: pending (due now), scheduled (run_at later), running, failed in
-- the last 24 hours, and how long the oldest due job has waited.
create or replace function kyrie.console_kinds()
returns table (kind text, pending bigint, scheduled bigint, running bigint,
               failed_day bigint, oldest_pending_seconds double precision)
language sql stable
set search_path = ''
as $$
  with waiting as (
    -- status = 'pending' matches jobs_claim_idx's predicate: an index scan
    -- over the queue, not the history.
    select j.kind,
           count(*) filter (where j.run_at <= now()) as pending,
           count(*) filter (where j.run_at > now()) as scheduled,
           extract(epoch from now() - min(greatest(j.run_at, j.created_at))
                   filter (where j.run_at <= now())) as oldest
    from public.jobs j where j.status = 'pending' group by j.kind
  ), running as (
    select j.kind, count(*) as running from public.jobs j where j.status = 'running' group by j.kind
  ), failed as (
    select j.kind, count(*) as failed_day from public.jobs j
    where j.status = 'failed' and j.finished_at > now() - interval '1 day' group by j.kind
  )
  select k.kind, coalesce(w.pending, 0), coalesce(w.scheduled, 0), coalesce(r.running, 0),
         coalesce(f.failed_day, 0), w.oldest
  from (select kind from waiting union select kind from running union select kind from failed) k
  left join waiting w using (kind) left join running r using (kind) left join failed f using (kind)
  order by k.kind
$$;

-- Jobs finished per bucket since p_since, by outcome; pickup latency
-- (started_at - greatest(run_at, created_at): how long a due job waited for a
-- worker) p50/p99 of the jobs finished in the bucket; model tokens they used
-- (jobs.usage.total_tokens: per job, counted when the job finishes).  Buckets
-- with nothing finished are returned too (zeros), so a chart has no gaps.
create or replace function kyrie.console_series(p_since timestamptz, p_bucket interval)
returns table (bucket timestamptz, completed bigint, failed bigint,
               latency_p50_ms double precision, latency_p99_ms double precision, tokens bigint)
language sql stable
set search_path = ''
as $$
  with finished as (
    select date_bin(p_bucket, j.finished_at, p_since) as bucket, j.status,
           extract(epoch from j.started_at - greatest(j.run_at, j.created_at)) * 1000 as latency_ms,
           case when jsonb_typeof(j.usage -> 'total_tokens') = 'number'
                then (j.usage ->> 'total_tokens')::numeric end as tokens
    from public.jobs j
    where j.status in ('completed', 'failed') and j.finished_at >= p_since
  ), buckets as (
    select b from generate_series(p_since, now(), p_bucket) b
  )
  select b.b,
         count(*) filter (where f.status = 'completed'),
         count(*) filter (where f.status = 'failed'),
         percentile_cont(0.5) within group (order by f.latency_ms),
         percentile_cont(0.99) within group (order by f.latency_ms),
         coalesce(sum(f.tokens), 0)::bigint
  from buckets b left join finished f on f.bucket = b.b
  group by b.b order by b.b
$$;

-- Workers heard from in the last p_within (they heartbeat while idle too),
-- with the jobs each holds now.
create or replace function kyrie.console_workers(p_within interval default interval '1 minute')
returns table (id text, hostname text, pid int, kinds text[], started_at timestamptz,
               last_seen timestamptz, running jsonb)
language sql stable
set search_path = ''
as $$
  select w.id, w.hostname, w.pid, w.kinds, w.started_at, w.last_seen,
         coalesce((select jsonb_agg(jsonb_build_object('id', j.id, 'kind', j.kind,
                                                      'started_at', j.started_at) order by j.started_at)
                   from public.jobs j where j.status = 'running' and j.lease_owner = w.id), '[]'::jsonb)
  from kyrie.workers w
  where w.last_seen > now() - p_within
  order by w.started_at
$$;

revoke all on function kyrie.console_kinds(), kyrie.console_series(timestamptz, interval),
  kyrie.console_workers(interval) from public, anon, authenticated;

-- The console's job list, one status at a time, newest first, paged by
-- (created_at, id).  Without it a page of failed jobs sorts the whole table.
-- It costs one more index entry per status change; status is already indexed
-- (the claim and retention indexes), so those updates were not HOT before.
create index if not exists jobs_status_created_idx on public.jobs (status, created_at desc, id desc);
