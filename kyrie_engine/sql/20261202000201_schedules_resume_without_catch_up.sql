-- A schedule switched back on starts with its next slot.
--
-- Until now a paused schedule, switched on again, ran the latest slot it
-- missed while off at the next pass (the downtime catch-up rule, which
-- cannot tell "the workers were down" from "the operator paused it"), and
-- whether it did depended on whether a worker's pass fell between the
-- UPDATE and the next slot.  A pause is a decision: its slots are skipped.
-- So each schedule remembers when it was last switched on, and a slot at or
-- before that moment is not due, as a slot before created_at never was.
-- A downtime of the workers while the schedule stays on still ends with
-- its latest missed slot run once.

alter table kyrie.schedules add column enabled_at timestamptz;
-- Existing rows: as if switched on when created, so a catch-up that was due
-- before this migration is still due after it.
update kyrie.schedules set enabled_at = created_at;
alter table kyrie.schedules
  alter column enabled_at set default kyrie.now(),
  alter column enabled_at set not null;
comment on column kyrie.schedules.enabled_at is
  'When the schedule was created or last switched on (false to true): slots at or before it are not due.';

-- A trigger, not the callers: psql's `update ... set enabled = true` is how
-- the README says to resume, and it must get the same rule as the CLI.
create or replace function kyrie.schedules_note_enabled() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.enabled_at := kyrie.now();
  return new;
end
$$;
revoke execute on function kyrie.schedules_note_enabled() from public, anon, authenticated, service_role;

create trigger schedules_note_enabled
before update of enabled on kyrie.schedules
for each row
when (new.enabled and not old.enabled)
execute function kyrie.schedules_note_enabled();

-- The body of 20261201000501, with the due rule after greatest(last slot,
-- switched on) instead of coalesce(last slot, created).  enabled_at is
-- never before created_at, so the old rule is the new one for a schedule
-- never paused.
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
    and p_slot > greatest(s.last_slot, s.enabled_at)
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
revoke execute on function kyrie.enqueue_schedule_slot(bigint, text, text, timestamptz, timestamptz)
  from public, anon, authenticated, service_role;
