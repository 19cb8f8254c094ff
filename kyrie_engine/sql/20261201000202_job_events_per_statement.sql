-- kyrie_job_events, one notification per statement and status instead of one per row.
--
-- The row trigger sent a notification for every job a claim or a batch of
-- completions touched: 40,000 for 20,000 no-op jobs, each built as jsonb,
-- queued, delivered to every listener and parsed there, although only two
-- kinds of follower exist (a worker watching for cancels, a stream watching
-- one job) and Realtime reads the WAL, not NOTIFY.  Now a statement sends one
-- notification per new status, listing the ids that changed:
--   {"id": "<uuid>", "status": "..."}            one job (unchanged format)
--   {"ids": ["<uuid>", ...], "status": "..."}    several, at most 150 a notification
-- 150 ids keep a payload near 5.7 kB, under NOTIFY's 8000-byte limit.
--
-- Statement-level with transition tables: the rows whose status or progress
-- changed are found by joining the old and new rows on the primary key.  A
-- heartbeat, which changes neither, finds none and sends nothing.  (A column
-- list, `after update of status, progress`, is not allowed with transition
-- tables.)

drop trigger jobs_notify_event on public.jobs;

create or replace function kyrie.notify_job_events() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  changed record;
  chunk int := 150;
begin
  for changed in
    select n.status, array_agg(n.id order by n.id) as ids
    from new_rows n
    join old_rows o on o.id = n.id
    where o.status is distinct from n.status or o.progress is distinct from n.progress
    group by n.status
  loop
    if cardinality(changed.ids) = 1 then
      perform pg_notify('kyrie_job_events',
                        jsonb_build_object('id', changed.ids[1], 'status', changed.status)::text);
    else
      for i in 0 .. (cardinality(changed.ids) - 1) / chunk loop
        perform pg_notify('kyrie_job_events', jsonb_build_object(
          'ids', changed.ids[i * chunk + 1 : (i + 1) * chunk], 'status', changed.status)::text);
      end loop;
    end if;
  end loop;
  return null;
end
$$;

create trigger jobs_notify_events after update on public.jobs
  referencing old table as old_rows new table as new_rows
  for each statement execute function kyrie.notify_job_events();

-- The row-level function is no longer used by any trigger.
drop function kyrie.notify_job_event();

revoke execute on function kyrie.notify_job_events() from public, anon, authenticated, service_role;
