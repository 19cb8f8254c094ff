-- Retention: finished jobs are deleted once their keep period is over, in
-- small batches, by one runner at a time however many workers call this.
--
-- Why in the engine, on by default: public.jobs is the queue and its history,
-- and a Postgres queue whose history is never pruned slows down as dead rows
-- and index entries pile up (Graphile Worker, River and pg-boss users report
-- it; River prunes by default).  kyrie.purge_jobs(interval) stays for
-- operators; this is what workers run on a timer (kyrie_engine.retention).
--
-- Actions survive their job: ai_actions.job_id is ON DELETE SET NULL and its
-- CHECK keeps metadata.original_job_id, so the app still knows which analysis
-- proposed an action after the job row is gone (the guarantee purge_jobs
-- already relies on).

-- Finding old finished jobs without reading the whole table: completed ones
-- had no index at all (jobs_failed_idx covers failed only).  (status,
-- finished_at) makes each status's "finished before the cutoff" one range
-- scan; partial, so pending and running rows (the hot path) never enter it.
-- Not CONCURRENTLY: a migration is one transaction, and CREATE INDEX
-- CONCURRENTLY cannot run in one.  It blocks writes to jobs while it builds,
-- which on a table that was never pruned may take a while: apply it outside
-- peak hours, or purge with kyrie.purge_jobs first.
create index if not exists jobs_finished_idx on public.jobs (status, finished_at)
  where finished_at is not null;

-- Vacuum a queue table as what it is: small and rewritten all day.  Every
-- job leaves dead row versions behind (its claim and its completion are
-- updates that cannot be HOT: they change indexed, partial-index columns),
-- and then its deletion; at the defaults (20% of the table, 2 ms cost delay)
-- autovacuum falls behind, the table and its indexes bloat, and the claim
-- scans walk dead entries: measured, a 1,000,000-job soak with retention
-- ended at 0.53x its starting throughput with 561 MiB for 87,000 live rows.
-- Thresholds in rows rather than a fraction of a table whose live size says
-- nothing about its churn, and no cost delay (the table is small, the work
-- is short).  Per-table settings: the cluster's stay as they are.
alter table public.jobs set (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 20000,
  autovacuum_vacuum_insert_scale_factor = 0,
  autovacuum_vacuum_insert_threshold = 20000,
  autovacuum_analyze_scale_factor = 0,
  autovacuum_analyze_threshold = 20000,
  autovacuum_vacuum_cost_delay = 0
);

-- Delete up to p_batch finished jobs: completed ones finished more than
-- p_keep_completed ago, failed and cancelled ones more than p_keep_failed ago
-- (a null period keeps them forever).  Returns how many were deleted, or null
-- when another runner holds the purge lock (its batch is in flight, so this
-- caller has nothing to add and goes back to sleep).
--
-- One runner at a time: pg_try_advisory_xact_lock, held until this call's
-- transaction ends, so a crashed runner can never leave it held, and nobody
-- waits for it.  Small batches keep each transaction (its row locks, the
-- ai_actions updates of ON DELETE SET NULL, its WAL) short beside the queue's
-- hot path; callers loop while full batches come back.
--
-- The cutoff conditions are repeated in the DELETE itself: a row an operator
-- retried (kyrie.retry_job: failed -> pending) after it was picked is
-- re-checked there after its lock, and kept.
create or replace function kyrie.purge_finished_jobs(
  p_keep_completed interval,
  p_keep_failed    interval,
  p_batch          int default 1000
) returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_deleted bigint;
begin
  -- 0x6b797269 ("kyri", migrate's lock) << 8 | 1: one key of the engine's own.
  if not pg_try_advisory_xact_lock(461599041793) then
    return null;
  end if;
  with doomed as (
    (select j.id from public.jobs j
     where j.status = 'completed' and j.finished_at < now() - p_keep_completed
     limit greatest(p_batch, 0))
    union all
    (select j.id from public.jobs j
     where j.status in ('failed', 'cancelled') and j.finished_at < now() - p_keep_failed
     limit greatest(p_batch, 0))
  ),
  gone as (
    delete from public.jobs j
    where j.id = any (array(select d.id from doomed d limit greatest(p_batch, 0)))
      and ((j.status = 'completed' and j.finished_at < now() - p_keep_completed)
           or (j.status in ('failed', 'cancelled') and j.finished_at < now() - p_keep_failed))
    returning 1
  )
  select count(*) into v_deleted from gone;
  return v_deleted;
end
$$;

revoke execute on function kyrie.purge_finished_jobs(interval, interval, int)
  from public, anon, authenticated, service_role;
