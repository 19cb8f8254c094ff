-- The console's job lists without jobs_status_created_idx.
--
-- That index (20261201000701) held every job under (status, created_at, id),
-- so each change of status wrote one more index entry: two per job (the
-- claim and the outcome), on the queue's hot path, for a page an operator
-- opens now and then.  Measured on a 20,000-job drain: 8 to 12 µs of the
-- database's ~78 µs per job.  The lists now read indexes that exist anyway,
-- or one that changes only when a job is enqueued:
--   - pending, newest first: jobs_pending_created_idx below, partial, so a
--     job leaves it when it is claimed without a new entry anywhere (an
--     entry whose row no longer matches is simply skipped, then vacuumed);
--   - running: the running set is bounded by the workers' slots
--     (jobs_running_lease_idx), sorted in memory;
--   - completed, failed, cancelled: most recently finished first, through
--     jobs_finished_idx (status, finished_at) of 20261201000302, which
--     retention needs anyway.  An operator looking at failures wants the
--     latest to fail, not the latest to be enqueued.
create index if not exists jobs_pending_created_idx on public.jobs (created_at desc, id desc)
  where status = 'pending';
drop index if exists public.jobs_status_created_idx;
