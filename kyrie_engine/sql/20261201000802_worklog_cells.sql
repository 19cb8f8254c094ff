-- The CFO's figures from a rollup of the worklogs kept by the worklogs' own
-- statements, instead of a pass over every worklog per analysis.
--
-- Before: kyrie.cfo_figures (20261201000401_cfo_one_pass.sql) read all the
-- workspace's worklogs up to the period's end and summed them per
-- (contract, user, day): on 50 contracts and 200,000 worklogs ~100 ms of an
-- analysis's ~230 ms (idle machine), of which the heap scan is a third and
-- the numeric sums most of the rest.  No index makes that pass cheaper: it
-- reads every row, and the "to date" figures need every row.
--
-- Now kyrie.worklog_cells holds, per (contract, user, day, billable,
-- invoiced, blank description), the number of entries and their hours,
-- maintained by statement-level triggers on public.worklogs (one upsert of
-- the statement's deltas, however many rows it wrote).  cfo_figures reads
-- the cells, a few thousand rows, and computes exactly what it computed from
-- the worklogs: every figure was already a sum of (contract, user, day)
-- sums, and numeric sums are exact, so summing per-cell subtotals gives the
-- same value.  The rules are still those of 20261125000006_cfo_figures.sql.
--
-- The price is on the write path: each INSERT/UPDATE/DELETE statement on
-- worklogs also upserts the cells it touches (a row lock per touched cell
-- until commit, so two writers of the same person's same day on the same
-- contract queue behind each other for that long).
--
-- Visibility: the cells carry workspace_id under the same policy as
-- worklogs (members of the workspace), and cfo_figures still joins the
-- contracts the caller can see, so RLS decides what an analysis counts, as
-- before.  Nobody but the triggers (SECURITY DEFINER) writes the cells.

create table kyrie.worklog_cells (
  workspace_id uuid not null,
  contract_id  uuid not null,
  user_id      uuid not null,
  work_date    date not null,
  billable     boolean not null,
  invoiced     boolean not null,
  -- btrim(description) = '': the missing_description anomaly's rule.
  blank        boolean not null,
  -- Never zero or less once a statement ends: the trigger that empties a
  -- cell deletes it.  (No CHECK: INSERT ... ON CONFLICT checks the proposed
  -- row, a negative delta, before it finds the cell the delta applies to.)
  entries      int not null,
  hours        numeric not null,
  -- The analysis reads one workspace's cells up to a day: the key leads with that.
  primary key (workspace_id, work_date, contract_id, user_id, billable, invoiced, blank)
);

comment on table kyrie.worklog_cells is
  'Worklogs summed per (contract, user, day, billable, invoiced, blank description); kept by triggers on '
  'public.worklogs, read by kyrie.cfo_figures under RLS.';

-- No foreign keys on purpose: a contract's or workspace's deletion cascades
-- to its worklogs, whose delete trigger then removes their cells; a key here
-- would race that cascade (cells gone first, then decremented).

alter table kyrie.worklog_cells enable row level security;

create policy worklog_cells_select on kyrie.worklog_cells
  for select to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()));

revoke all on kyrie.worklog_cells from public, anon, authenticated, service_role;
grant select on kyrie.worklog_cells to authenticated, service_role;

-- One function for the three statement triggers (a trigger with transition
-- tables has one event, and each event sees only its own transition tables,
-- hence three statements below).  The statement's rows become signed deltas
-- per cell (+ new rows, - old rows), summed, and applied in key order (two
-- statements touching the same cells lock them in the same order, so they
-- wait for each other instead of deadlocking).  An UPDATE that changes none
-- of the cells' columns (a description edited, say) yields zero deltas,
-- which are skipped.  A decrement always finds its cell: the rows it removes
-- were counted into it when written.  Cells whose entries reach zero are
-- deleted afterwards (a separate statement: it must see the upsert's result).
create or replace function kyrie.worklog_cells_apply() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if tg_op = 'INSERT' then
    insert into kyrie.worklog_cells as c
      (workspace_id, contract_id, user_id, work_date, billable, invoiced, blank, entries, hours)
    select n.workspace_id, n.contract_id, n.user_id, n.work_date, n.billable, n.invoiced,
           btrim(n.description) = '', count(*), sum(n.hours)
    from new_rows n
    group by 1, 2, 3, 4, 5, 6, 7
    order by 1, 4, 2, 3, 5, 6, 7
    on conflict (workspace_id, work_date, contract_id, user_id, billable, invoiced, blank)
      do update set entries = c.entries + excluded.entries, hours = c.hours + excluded.hours;
    return null;
  elsif tg_op = 'UPDATE' then
    insert into kyrie.worklog_cells as c
      (workspace_id, contract_id, user_id, work_date, billable, invoiced, blank, entries, hours)
    select d.workspace_id, d.contract_id, d.user_id, d.work_date, d.billable, d.invoiced, d.blank,
           sum(d.sign), sum(d.sign * d.hours)
    from (
      select 1 as sign, n.workspace_id, n.contract_id, n.user_id, n.work_date, n.billable, n.invoiced,
             btrim(n.description) = '' as blank, n.hours
      from new_rows n
      union all
      select -1, o.workspace_id, o.contract_id, o.user_id, o.work_date, o.billable, o.invoiced,
             btrim(o.description) = '', o.hours
      from old_rows o
    ) d
    group by 1, 2, 3, 4, 5, 6, 7
    having sum(d.sign) <> 0 or sum(d.sign * d.hours) <> 0
    order by 1, 4, 2, 3, 5, 6, 7
    on conflict (workspace_id, work_date, contract_id, user_id, billable, invoiced, blank)
      do update set entries = c.entries + excluded.entries, hours = c.hours + excluded.hours;
  else
    insert into kyrie.worklog_cells as c
      (workspace_id, contract_id, user_id, work_date, billable, invoiced, blank, entries, hours)
    select o.workspace_id, o.contract_id, o.user_id, o.work_date, o.billable, o.invoiced,
           btrim(o.description) = '', -count(*), -sum(o.hours)
    from old_rows o
    group by 1, 2, 3, 4, 5, 6, 7
    order by 1, 4, 2, 3, 5, 6, 7
    on conflict (workspace_id, work_date, contract_id, user_id, billable, invoiced, blank)
      do update set entries = c.entries + excluded.entries, hours = c.hours + excluded.hours;
  end if;

  delete from kyrie.worklog_cells c
  using (select distinct o.workspace_id, o.work_date, o.contract_id, o.user_id from old_rows o) o
  where c.workspace_id = o.workspace_id
    and c.work_date = o.work_date
    and c.contract_id = o.contract_id
    and c.user_id = o.user_id
    and c.entries = 0;
  return null;
end
$$;

comment on function kyrie.worklog_cells_apply() is
  'Statement trigger on public.worklogs: applies the statement''s rows to kyrie.worklog_cells.';

create or replace function kyrie.worklog_cells_truncate() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  truncate kyrie.worklog_cells;
  return null;
end
$$;

comment on function kyrie.worklog_cells_truncate() is
  'Statement trigger on public.worklogs: a TRUNCATE of the worklogs empties their cells.';

-- Triggers first, then the backfill: creating a trigger locks the table
-- against writes (SHARE ROW EXCLUSIVE) until this migration commits, so no
-- worklog is written between the two and none is counted twice or missed.
create trigger worklogs_cells_insert after insert on public.worklogs
  referencing new table as new_rows
  for each statement execute function kyrie.worklog_cells_apply();
create trigger worklogs_cells_update after update on public.worklogs
  referencing old table as old_rows new table as new_rows
  for each statement execute function kyrie.worklog_cells_apply();
create trigger worklogs_cells_delete after delete on public.worklogs
  referencing old table as old_rows
  for each statement execute function kyrie.worklog_cells_apply();
create trigger worklogs_cells_truncate after truncate on public.worklogs
  for each statement execute function kyrie.worklog_cells_truncate();

insert into kyrie.worklog_cells
  (workspace_id, contract_id, user_id, work_date, billable, invoiced, blank, entries, hours)
select w.workspace_id, w.contract_id, w.user_id, w.work_date, w.billable, w.invoiced,
       btrim(w.description) = '', count(*), sum(w.hours)
from public.worklogs w
group by 1, 2, 3, 4, 5, 6, 7;

-- ---------------------------------------------------------------------------
-- kyrie.cfo_figures, from the cells.  Same signature, same result.  The
-- (contract, user, day) sums of the one pass are gone: contract_days and
-- long_days sum the cells directly.  So is the work_mem the pass needed for
-- 200,000 rows: a workspace's cells are bounded by contracts x people x days.

create or replace function kyrie.cfo_figures(
  p_workspace_id uuid,
  p_period_start date default null,
  p_period_end   date default null,
  p_contract_ids uuid[] default null
) returns table (
  contracts kyrie.contract_figure[],   -- ordered by client_name, title, id
  totals    kyrie.currency_total[],    -- ordered by currency
  anomalies kyrie.worklog_anomaly[]    -- ordered by kind, first_date, contract_id, user_id
)
language sql
stable
security invoker
set search_path = ''
as $$
  with period as (
    select coalesce(p_period_start, coalesce(p_period_end, current_date) - 89) as first_day,
           coalesce(p_period_end, current_date) as last_day
  ),
  scope as (
    select c.*,
           case when c.billing_type = 'hourly' then c.hourly_rate
                when c.budget_hours is not null then c.fixed_fee / c.budget_hours
           end as rate,
           case when c.billing_type = 'fixed' then c.fixed_fee end as cap,
           least(p.last_day, coalesce(c.end_date, p.last_day)) - greatest(p.first_day, c.start_date) + 1
             as active_days
    from public.contracts c, period p
    where c.workspace_id = p_workspace_id
      and (p_contract_ids is null or c.id = any (p_contract_ids))
  ),
  -- The cells up to the period's end of the contracts in scope: only those
  -- the user can see and asked for count (scope is under RLS, and so are the
  -- cells).  Every figure below is a sum of these (numeric sums are exact,
  -- so summing subtotals gives the same value as summing the worklogs): a
  -- few thousand rows of kyrie.worklog_cells instead of every worklog.
  scoped_cells as (
    select c.contract_id, c.user_id, c.work_date, c.billable, c.invoiced, c.blank, c.entries, c.hours,
           c.work_date >= p.first_day as in_period
    from kyrie.worklog_cells c
    join scope s on s.id = c.contract_id
    cross join period p
    where c.workspace_id = p_workspace_id
      and c.work_date <= p.last_day
      and (p_contract_ids is null or c.contract_id = any (p_contract_ids))
  ),
  contract_days as (
    select c.contract_id, c.work_date, bool_or(c.in_period) as in_period,
           sum(c.entries) as n, sum(c.hours) as hours,
           sum(c.hours) filter (where c.billable) as billable,
           sum(c.hours) filter (where c.invoiced) as invoiced,
           coalesce(sum(c.entries) filter (where c.blank), 0) as blank_n,
           sum(c.hours) filter (where c.blank) as blank_h,
           s.start_date, s.end_date, s.budget_hours
    from scoped_cells c
    join scope s on s.id = c.contract_id
    group by c.contract_id, c.work_date, s.start_date, s.end_date, s.budget_hours
  ),
  long_days as (
    select c.user_id, c.work_date, sum(c.hours) as hours
    from scoped_cells c
    where c.in_period
    group by c.user_id, c.work_date
    having sum(c.hours) > 12
  ),
  logged as (
    select d.contract_id,
           sum(d.hours) filter (where d.in_period) as hours_period,
           sum(d.billable) filter (where d.in_period) as billable_period,
           sum(d.billable) filter (where not d.in_period) as billable_before,
           sum(d.billable) as billable_to_date,
           sum(d.invoiced) as invoiced_to_date,
           sum(d.hours) as hours_to_date
    from contract_days d
    group by d.contract_id
  ),
  figures as (
    select s.*,
           coalesce(l.hours_period, 0) as hours_period,
           coalesce(l.billable_period, 0) as billable_period,
           coalesce(l.hours_to_date, 0) as hours_to_date,
           coalesce(l.billable_to_date, 0) - coalesce(l.invoiced_to_date, 0) as unbilled,
           kyrie.cfo_earned(l.billable_to_date, s.rate, s.cap)
             - kyrie.cfo_earned(l.billable_before, s.rate, s.cap) as value_period,
           kyrie.cfo_earned(l.billable_to_date, s.rate, s.cap)
             - kyrie.cfo_earned(l.invoiced_to_date, s.rate, s.cap) as value_unbilled
    from scope s
    left join logged l on l.contract_id = s.id
  ),
  -- The day each contract's running total of hours reached its budget
  -- (used only for contracts already at or over it).
  exhausted as (
    select distinct on (r.contract_id) r.contract_id, r.work_date
    from (
      select d.contract_id, d.work_date, d.budget_hours,
             sum(d.hours) over (partition by d.contract_id order by d.work_date) as running_hours
      from contract_days d
      where d.budget_hours is not null
    ) r
    where r.running_hours >= r.budget_hours
    order by r.contract_id, r.work_date
  ),
  per_contract as (
    select (
             f.id, f.client_name, f.title, f.billing_type, f.status, f.currency,
             f.hourly_rate, f.fixed_fee, f.budget_hours, f.start_date, f.end_date,
             round(f.hours_period, 2),
             round(f.billable_period, 2),
             round(f.value_period, 2),
             round(f.hours_to_date, 2),
             round(100 * f.hours_to_date / f.budget_hours, 2),
             round(f.budget_hours - f.hours_to_date, 2),
             f.hours_to_date > f.budget_hours,
             case when f.billing_type = 'fixed' and f.hours_to_date > 0
                  then round(f.fixed_fee / f.hours_to_date, 2) end,
             round(f.unbilled, 2),
             round(f.value_unbilled, 2),
             case when f.active_days > 0 then round(f.hours_period * 7 / f.active_days, 2) end,
             case when f.budget_hours is null then null
                  when f.hours_to_date >= f.budget_hours then e.work_date
                  -- As before: numeric comparison first, so a huge budget and a
                  -- tiny burn cannot overflow the int cast or the date.
                  when f.hours_period > 0 and f.active_days > 0
                       and ceil((f.budget_hours - f.hours_to_date) * f.active_days / f.hours_period)
                           <= coalesce(f.end_date - p.last_day, 36500)
                    then p.last_day
                         + ceil((f.budget_hours - f.hours_to_date) * f.active_days / f.hours_period)::int
             end
           )::kyrie.contract_figure as c
    from figures f
    cross join period p
    left join exhausted e on e.contract_id = f.id
  ),
  per_currency as (
    select ((c).currency, count(*)::int, sum((c).hours_logged), sum((c).billable_hours),
            sum((c).billable_value), sum((c).unbilled_hours), sum((c).unbilled_value)
           )::kyrie.currency_total as t
    from per_contract
    group by (c).currency
  ),
  anomaly_rows as (
    select 'day_over_12h'::text as kind, null::uuid as contract_id, d.user_id, count(*)::int as occurrences,
           round(sum(d.hours), 2) as hours, min(d.work_date) as first_date, max(d.work_date) as last_date
    from long_days d
    group by d.user_id
    union all
    select 'missing_description', d.contract_id, null, sum(d.blank_n)::int, round(sum(d.blank_h), 2),
           min(d.work_date), max(d.work_date)
    from contract_days d
    where d.in_period and d.blank_n > 0
    group by d.contract_id
    union all
    select 'outside_contract_dates', d.contract_id, null, sum(d.n)::int, round(sum(d.hours), 2),
           min(d.work_date), max(d.work_date)
    from contract_days d
    where d.in_period and (d.work_date < d.start_date or d.work_date > d.end_date)
    group by d.contract_id
  )
  select
    coalesce((select array_agg(c order by (c).client_name, (c).title, (c).contract_id) from per_contract),
             '{}'),
    coalesce((select array_agg(t order by (t).currency) from per_currency), '{}'),
    coalesce((select array_agg((a.kind, a.contract_id, a.user_id, a.occurrences, a.hours, a.first_date,
                                a.last_date)::kyrie.worklog_anomaly
                               order by a.kind, a.first_date, a.contract_id, a.user_id)
              from anomaly_rows a), '{}')
$$;

comment on function kyrie.cfo_figures(uuid, date, date, uuid[]) is
  'contract_figures, currency_totals and worklog_anomalies from the worklog cells, as the caller (RLS applies).';

-- ---------------------------------------------------------------------------
-- kyrie.contract_figures returned a 23-column table that repeated the
-- composite kyrie.contract_figure column for column (20261201000401); it now
-- returns that type, so its columns have one home.  Same columns, same
-- types, same rows and order.  A changed return type cannot be replaced, so
-- the function is dropped and granted again exactly as before (nothing in the
-- schema depends on it: the app and the tests call it by name).

drop function kyrie.contract_figures(uuid, date, date, uuid[]);

create function kyrie.contract_figures(
  p_workspace_id uuid,
  p_period_start date default null,
  p_period_end   date default null,
  p_contract_ids uuid[] default null
) returns setof kyrie.contract_figure
language sql
stable
security invoker
set search_path = ''
as $$
  select c.contract_id, c.client_name, c.title, c.billing_type, c.status, c.currency, c.hourly_rate,
         c.fixed_fee, c.budget_hours, c.start_date, c.end_date, c.hours_logged, c.billable_hours,
         c.billable_value, c.budget_used_hours, c.budget_used_pct, c.budget_remaining_hours,
         c.over_budget, c.effective_hourly_rate, c.unbilled_hours, c.unbilled_value,
         c.burn_rate_hours_per_week, c.budget_exhausted_on
  from kyrie.cfo_figures(p_workspace_id, p_period_start, p_period_end, p_contract_ids) f,
       unnest(f.contracts) with ordinality c
  order by c.ordinality
$$;

comment on function kyrie.contract_figures(uuid, date, date, uuid[]) is
  'Per-contract hours, value, budget, unbilled time, burn rate and budget run-out date, as the caller (RLS applies).';

-- What the columns mean (20261125000006_cfo_figures.sql has the rules), now on the type itself.
comment on column kyrie.contract_figure.hours_logged is 'In the period, billable or not.';
comment on column kyrie.contract_figure.billable_hours is 'In the period.';
comment on column kyrie.contract_figure.billable_value is 'In the period (see the valuation rule).';
comment on column kyrie.contract_figure.budget_used_hours is 'To date, billable or not.';
comment on column kyrie.contract_figure.budget_remaining_hours is 'Negative when over budget.';
comment on column kyrie.contract_figure.effective_hourly_rate is
  'Fixed fee / hours to date (fixed-fee contracts only).';
comment on column kyrie.contract_figure.unbilled_hours is 'Billable, not invoiced, to date.';
comment on column kyrie.contract_figure.burn_rate_hours_per_week is
  'Hours in the period / weeks the contract was active in it.';
comment on column kyrie.contract_figure.budget_exhausted_on is
  'When over budget: the day it ran out; else projected at the burn rate (null when the contract ends first).';

revoke execute on function kyrie.contract_figures(uuid, date, date, uuid[]) from public, anon;
grant execute on function kyrie.contract_figures(uuid, date, date, uuid[]) to authenticated, service_role;

revoke execute on function kyrie.worklog_cells_apply(), kyrie.worklog_cells_truncate()
  from public, anon, authenticated, service_role;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants (see the foundation file).
revoke execute on all functions in schema kyrie from public;
