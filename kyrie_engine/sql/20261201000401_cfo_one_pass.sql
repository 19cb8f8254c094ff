-- The CFO's figures in one pass over the period's worklogs.
--
-- Before: an analysis called contract_figures (one scan of the workspace's
-- worklogs up to the period's end, and a second one of the over-budget
-- contracts' for the run-out day), currency_totals (all of contract_figures
-- again) and worklog_anomalies (a third scan, joined to contracts row by
-- row): four to five passes, 340 ms of a 414 ms analysis on 200,000 worklogs.
--
-- Now kyrie.cfo_figures reads the worklogs once and returns all three
-- results as arrays of composite values; the engine's tools call it once per
-- analysis and share its answer.  contract_figures, currency_totals and
-- worklog_anomalies keep their signatures and results (definitions and
-- rules: 20261125000006_cfo_figures.sql, whose comments still hold) and
-- now unnest its arrays, so psql, the app and the tests see exactly what the
-- agent sees.
--
-- Still SECURITY INVOKER: the scan runs as the requesting user, RLS on
-- contracts and worklogs bounds it, p_workspace_id only narrows.
--
-- The pass sums the worklogs per (contract, user, day) in one hash
-- aggregate; every figure is then a sum of those cells (numeric sums are
-- exact, so summing subtotals gives the same value as summing rows): the
-- per-contract figures and the run-out day (a running sum) from the
-- (contract, day) sums, the long days from the (user, day) sums, blank
-- descriptions and out-of-dates entries counted per (contract, day).
-- Measured on 50 contracts and 200,000 worklogs (EXPLAIN ANALYZE, PG 15):
-- the three functions took 240 + 235 + 157 ms; this one 85-100 ms (the
-- bitmap heap scan of the rows alone is ~32 ms).

create type kyrie.contract_figure as (
  contract_id             uuid,
  client_name             text,
  title                   text,
  billing_type            text,
  status                  text,
  currency                text,
  hourly_rate             numeric,
  fixed_fee               numeric,
  budget_hours            numeric,
  start_date              date,
  end_date                date,
  hours_logged            numeric,
  billable_hours          numeric,
  billable_value          numeric,
  budget_used_hours       numeric,
  budget_used_pct         numeric,
  budget_remaining_hours  numeric,
  over_budget             boolean,
  effective_hourly_rate   numeric,
  unbilled_hours          numeric,
  unbilled_value          numeric,
  burn_rate_hours_per_week numeric,
  budget_exhausted_on     date
);

create type kyrie.currency_total as (
  currency        text,
  contracts       int,
  hours_logged    numeric,
  billable_hours  numeric,
  billable_value  numeric,
  unbilled_hours  numeric,
  unbilled_value  numeric
);

create type kyrie.worklog_anomaly as (
  kind        text,
  contract_id uuid,
  user_id     uuid,
  occurrences int,
  hours       numeric,
  first_date  date,
  last_date   date
);

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
-- The cells' hash table is ~8 MB for 200,000 worklogs over a year; at the
-- default 4 MB the planner sorts the rows to disk instead (2x slower).
-- Bounded by contracts x people x days, and a hash aggregate spills anyway.
set work_mem = '32MB'
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
  -- The one pass: the workspace's worklogs up to the period's end (the
  -- (workspace_id, work_date) index), summed per (contract, user, day):
  -- every other figure is a sum of these cells, and there are at most
  -- contracts x people x days of them, whatever the number of worklogs.
  cells as (
    select r.contract_id, r.user_id, r.work_date,
           count(*) as n,
           sum(r.hours) as hours,
           sum(r.hours) filter (where r.billable) as billable,
           sum(r.hours) filter (where r.invoiced) as invoiced,
           count(*) filter (where r.blank) as blank_n,
           sum(r.hours) filter (where r.blank) as blank_h
    from (
      select w.contract_id, w.user_id, w.work_date, w.hours, w.billable, w.invoiced,
             -- btrim(description) = '', tested once per row (the OFFSET 0 keeps the
             -- planner from copying the expression into both FILTERs), and
             -- btrim only for the rare description that starts with a space.
             (w.description = '' or (left(w.description, 1) = ' ' and btrim(w.description) = ''))
               as blank
      from public.worklogs w
      cross join period p
      where w.workspace_id = p_workspace_id
        and w.work_date <= p.last_day
        and (p_contract_ids is null or w.contract_id = any (p_contract_ids))
      offset 0
    ) r
    group by r.contract_id, r.user_id, r.work_date
  ),
  -- Only contracts the user can see and asked for count (scope is under
  -- RLS), as when worklog_anomalies joined contracts row by row; contract_id
  -- is a key of the cells, so joining here drops the same worklogs.
  scoped_cells as (
    select c.*, c.work_date >= p.first_day as in_period
    from cells c
    join scope s on s.id = c.contract_id
    cross join period p
  ),
  contract_days as (
    select c.contract_id, c.work_date, bool_or(c.in_period) as in_period,
           sum(c.n) as n, sum(c.hours) as hours, sum(c.billable) as billable, sum(c.invoiced) as invoiced,
           sum(c.blank_n) as blank_n, sum(c.blank_h) as blank_h,
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
  'contract_figures, currency_totals and worklog_anomalies from one pass over the worklogs, as the caller (RLS applies).';

-- The three functions an analysis used to call, now read from the one pass
-- (same signatures, same rows, same order).

create or replace function kyrie.contract_figures(
  p_workspace_id uuid,
  p_period_start date default null,
  p_period_end   date default null,
  p_contract_ids uuid[] default null
) returns table (
  contract_id             uuid,
  client_name             text,
  title                   text,
  billing_type            text,
  status                  text,
  currency                text,
  hourly_rate             numeric,
  fixed_fee               numeric,
  budget_hours            numeric,
  start_date              date,
  end_date                date,
  hours_logged            numeric,
  billable_hours          numeric,
  billable_value          numeric,
  budget_used_hours       numeric,
  budget_used_pct         numeric,
  budget_remaining_hours  numeric,
  over_budget             boolean,
  effective_hourly_rate   numeric,
  unbilled_hours          numeric,
  unbilled_value          numeric,
  burn_rate_hours_per_week numeric,
  budget_exhausted_on     date
)
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

create or replace function kyrie.currency_totals(
  p_workspace_id uuid,
  p_period_start date default null,
  p_period_end   date default null,
  p_contract_ids uuid[] default null
) returns table (
  currency        text,
  contracts       int,
  hours_logged    numeric,
  billable_hours  numeric,
  billable_value  numeric,
  unbilled_hours  numeric,
  unbilled_value  numeric
)
language sql
stable
security invoker
set search_path = ''
as $$
  select t.currency, t.contracts, t.hours_logged, t.billable_hours, t.billable_value, t.unbilled_hours,
         t.unbilled_value
  from kyrie.cfo_figures(p_workspace_id, p_period_start, p_period_end, p_contract_ids) f,
       unnest(f.totals) with ordinality t
  order by t.ordinality
$$;

create or replace function kyrie.worklog_anomalies(
  p_workspace_id uuid,
  p_period_start date default null,
  p_period_end   date default null,
  p_contract_ids uuid[] default null
) returns table (
  kind        text,
  contract_id uuid,
  user_id     uuid,
  occurrences int,
  hours       numeric,
  first_date  date,
  last_date   date
)
language sql
stable
security invoker
set search_path = ''
as $$
  select a.kind, a.contract_id, a.user_id, a.occurrences, a.hours, a.first_date, a.last_date
  from kyrie.cfo_figures(p_workspace_id, p_period_start, p_period_end, p_contract_ids) f,
       unnest(f.anomalies) with ordinality a
  order by a.ordinality
$$;

revoke execute on function kyrie.cfo_figures(uuid, date, date, uuid[]) from public, anon;
grant execute on function kyrie.cfo_figures(uuid, date, date, uuid[]) to authenticated, service_role;
