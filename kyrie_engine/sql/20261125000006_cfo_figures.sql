-- The CFO's figures: every number an analysis reports is computed here, by
-- the database, never by the model.  The agent's tools call these functions;
-- so can psql, the app (through an RPC wrapper of its own), and the tests
-- that check the agent's report against independent SQL.
--
-- SECURITY INVOKER, deliberately: they run as the requesting user (the
-- engine's tools SET LOCAL ROLE authenticated with the user's claims), so Row
-- Level Security on contracts and worklogs bounds what they can aggregate.
-- `p_workspace_id` narrows the result to one workspace; it cannot widen it,
-- whatever a caller passes.
--
-- Period: [p_period_start, p_period_end], both inclusive.  A missing end is
-- today; a missing start is 89 days before the end (a 90-day quarter).
-- "In the period" figures count worklogs dated inside it; "to date" figures
-- (budget, unbilled time, effective rate) count everything dated up to the
-- period's end, because a budget or an unbilled hour does not reset with the
-- period.
--
-- Valuation, one rule for both billing types.  A billable hour is worth the
-- contract's rate: the hourly rate, or for fixed-fee work the fee spread over
-- the budgeted hours (no budget: no rate, so no values).  What has been
-- earned up to a date is hours x rate, capped at the fee for fixed-fee work
-- (an over-budget fixed contract earns nothing more).  Then
--   billable_value (period) = earned(to the end) - earned(before the start)
--   unbilled_value (to date) = earned(billable, to the end) - earned(invoiced, to the end)
-- which for hourly work is simply hours x rate.
--
-- Money and hours are rounded to 2 decimals, percentages to 2, only at the
-- end; the agent's report must repeat them exactly.

create or replace function kyrie.cfo_earned(p_hours numeric, p_rate numeric, p_cap numeric)
returns numeric
language sql
immutable
set search_path = ''
as $$
  select case when p_rate is null then null
              when p_cap is null then coalesce(p_hours, 0) * p_rate
              else least(p_cap, coalesce(p_hours, 0) * p_rate) end
$$;

comment on function kyrie.cfo_earned(numeric, numeric, numeric) is
  'Value of p_hours at p_rate, capped at p_cap (a fixed fee) when given; unrounded.';

-- ---------------------------------------------------------------------------
-- Per contract.

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
  hours_logged            numeric,  -- in the period, billable or not
  billable_hours          numeric,  -- in the period
  billable_value          numeric,  -- in the period (see valuation above)
  budget_used_hours       numeric,  -- to date, billable or not
  budget_used_pct         numeric,
  budget_remaining_hours  numeric,  -- negative when over budget
  over_budget             boolean,
  effective_hourly_rate   numeric,  -- fixed fee / hours to date (fixed-fee contracts only)
  unbilled_hours          numeric,  -- billable, not invoiced, to date
  unbilled_value          numeric,
  burn_rate_hours_per_week numeric, -- hours in the period / weeks the contract was active in it
  budget_exhausted_on     date      -- when over budget: the day it ran out; else projected at the burn
                                    -- rate (null when the contract ends first)
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
           -- Days of the period during which the contract ran.
           least(p.last_day, coalesce(c.end_date, p.last_day)) - greatest(p.first_day, c.start_date) + 1
             as active_days
    from public.contracts c, period p
    where c.workspace_id = p_workspace_id
      and (p_contract_ids is null or c.id = any (p_contract_ids))
  ),
  -- One pass over the workspace's worklogs up to the period's end (the
  -- (workspace_id, work_date) index), every sum a FILTER of the same group.
  logged as (
    select w.contract_id,
           sum(w.hours) filter (where w.work_date >= p.first_day) as hours_period,
           sum(w.hours) filter (where w.billable and w.work_date >= p.first_day) as billable_period,
           sum(w.hours) filter (where w.billable and w.work_date < p.first_day) as billable_before,
           sum(w.hours) filter (where w.billable) as billable_to_date,
           sum(w.hours) filter (where w.invoiced) as invoiced_to_date,
           sum(w.hours) as hours_to_date
    from public.worklogs w, period p
    where w.workspace_id = p_workspace_id
      and w.work_date <= p.last_day
      and (p_contract_ids is null or w.contract_id = any (p_contract_ids))
    group by w.contract_id
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
  -- For contracts already at or over budget: the day the running total of
  -- hours reached it.  Only their worklogs are read again.
  exhausted as (
    select distinct on (d.contract_id) d.contract_id, d.work_date
    from (
      select w.contract_id, w.work_date,
             sum(sum(w.hours)) over (partition by w.contract_id order by w.work_date) as running_hours
      from public.worklogs w
      join figures f on f.id = w.contract_id and f.budget_hours <= f.hours_to_date
      cross join period p
      where w.workspace_id = p_workspace_id
        and w.work_date <= p.last_day
      group by w.contract_id, w.work_date
    ) d
    join figures f on f.id = d.contract_id
    where d.running_hours >= f.budget_hours
    order by d.contract_id, d.work_date
  )
  select f.id,
         f.client_name,
         f.title,
         f.billing_type,
         f.status,
         f.currency,
         f.hourly_rate,
         f.fixed_fee,
         f.budget_hours,
         f.start_date,
         f.end_date,
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
              -- Remaining hours at the period's average daily burn, from its last day;
              -- none when that falls after the contract's end (it ends first) or
              -- more than a century away (compared as numeric: a huge budget and a
              -- tiny burn must not overflow the int cast or the date).
              when f.hours_period > 0 and f.active_days > 0
                   and ceil((f.budget_hours - f.hours_to_date) * f.active_days / f.hours_period)
                       <= coalesce(f.end_date - p.last_day, 36500)
                then p.last_day + ceil((f.budget_hours - f.hours_to_date) * f.active_days / f.hours_period)::int
         end
  from figures f
  cross join period p
  left join exhausted e on e.contract_id = f.id
  order by f.client_name, f.title, f.id
$$;

comment on function kyrie.contract_figures(uuid, date, date, uuid[]) is
  'Per-contract hours, value, budget, unbilled time, burn rate and budget run-out date, as the caller (RLS applies).';

-- ---------------------------------------------------------------------------
-- Totals per currency (amounts in different currencies are never added up).

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
  select f.currency,
         count(*)::int,
         sum(f.hours_logged),
         sum(f.billable_hours),
         sum(f.billable_value),
         sum(f.unbilled_hours),
         sum(f.unbilled_value)
  from kyrie.contract_figures(p_workspace_id, p_period_start, p_period_end, p_contract_ids) f
  group by f.currency
  order by f.currency
$$;

-- Hours count every contract; values only those that have one (a fixed fee
-- without budget hours has no hourly rate), so hours x rate need not match.
comment on function kyrie.currency_totals(uuid, date, date, uuid[]) is
  'kyrie.contract_figures summed per currency, as the caller (RLS applies). Values skip contracts without a rate.';

-- ---------------------------------------------------------------------------
-- Worklog anomalies in the period, summarised (never one row per worklog:
-- the result goes into a model's context, so its size must not grow with
-- the number of worklogs).
--
--   day_over_12h            per user: days on which they logged more than 12
--                           hours in total (all contracts in scope)
--   missing_description     per contract: entries whose description is blank
--   outside_contract_dates  per contract: entries dated before its start or
--                           after its end

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
  with period as (
    select coalesce(p_period_start, coalesce(p_period_end, current_date) - 89) as first_day,
           coalesce(p_period_end, current_date) as last_day
  ),
  scoped as (
    select w.contract_id, w.user_id, w.work_date, w.hours, w.description,
           c.start_date, c.end_date
    from public.worklogs w
    join public.contracts c on c.id = w.contract_id and c.workspace_id = w.workspace_id
    cross join period p
    where w.workspace_id = p_workspace_id
      and w.work_date between p.first_day and p.last_day
      and (p_contract_ids is null or w.contract_id = any (p_contract_ids))
  ),
  long_days as (
    select s.user_id, s.work_date, sum(s.hours) as hours
    from scoped s
    group by s.user_id, s.work_date
    having sum(s.hours) > 12
  ),
  per_contract as (
    select s.contract_id,
           count(*) filter (where btrim(s.description) = '') as missing_n,
           sum(s.hours) filter (where btrim(s.description) = '') as missing_h,
           min(s.work_date) filter (where btrim(s.description) = '') as missing_first,
           max(s.work_date) filter (where btrim(s.description) = '') as missing_last,
           count(*) filter (where s.work_date < s.start_date or s.work_date > s.end_date) as outside_n,
           sum(s.hours) filter (where s.work_date < s.start_date or s.work_date > s.end_date) as outside_h,
           min(s.work_date) filter (where s.work_date < s.start_date or s.work_date > s.end_date)
             as outside_first,
           max(s.work_date) filter (where s.work_date < s.start_date or s.work_date > s.end_date)
             as outside_last
    from scoped s
    group by s.contract_id
  )
  select * from (
    select 'day_over_12h'::text, null::uuid, d.user_id, count(*)::int, round(sum(d.hours), 2),
           min(d.work_date), max(d.work_date)
    from long_days d
    group by d.user_id
    union all
    select 'missing_description', c.contract_id, null, c.missing_n::int, round(c.missing_h, 2),
           c.missing_first, c.missing_last
    from per_contract c
    where c.missing_n > 0
    union all
    select 'outside_contract_dates', c.contract_id, null, c.outside_n::int, round(c.outside_h, 2),
           c.outside_first, c.outside_last
    from per_contract c
    where c.outside_n > 0
  ) a (kind, contract_id, user_id, occurrences, hours, first_date, last_date)
  order by a.kind, a.first_date, a.contract_id, a.user_id
$$;

comment on function kyrie.worklog_anomalies(uuid, date, date, uuid[]) is
  'Long days per user, blank descriptions and out-of-dates entries per contract, as the caller (RLS applies).';

-- ---------------------------------------------------------------------------
-- Recent worklog descriptions of one contract: what the people doing the work
-- wrote.  Untrusted text: the engine hands it to the model as data, delimited.

create or replace function kyrie.worklog_notes(
  p_workspace_id uuid,
  p_contract_id  uuid,
  p_period_start date default null,
  p_period_end   date default null,
  p_limit        int default 20
) returns table (
  work_date   date,
  hours       numeric,
  billable    boolean,
  invoiced    boolean,
  description text
)
language sql
stable
security invoker
set search_path = ''
as $$
  select w.work_date, w.hours, w.billable, w.invoiced, left(w.description, 500)
  from public.worklogs w
  where w.workspace_id = p_workspace_id
    and w.contract_id = p_contract_id
    and w.work_date between coalesce(p_period_start, coalesce(p_period_end, current_date) - 89)
                        and coalesce(p_period_end, current_date)
  order by w.work_date desc, w.created_at desc, w.id
  limit least(greatest(coalesce(p_limit, 20), 0), 100)
$$;

comment on function kyrie.worklog_notes(uuid, uuid, date, date, int) is
  'Latest worklog entries of one contract (descriptions cut to 500 characters), as the caller (RLS applies).';

-- ---------------------------------------------------------------------------

revoke execute on function
  kyrie.cfo_earned(numeric, numeric, numeric),
  kyrie.contract_figures(uuid, date, date, uuid[]),
  kyrie.currency_totals(uuid, date, date, uuid[]),
  kyrie.worklog_anomalies(uuid, date, date, uuid[]),
  kyrie.worklog_notes(uuid, uuid, date, date, int)
from public, anon;
grant execute on function
  kyrie.cfo_earned(numeric, numeric, numeric),
  kyrie.contract_figures(uuid, date, date, uuid[]),
  kyrie.currency_totals(uuid, date, date, uuid[]),
  kyrie.worklog_anomalies(uuid, date, date, uuid[]),
  kyrie.worklog_notes(uuid, uuid, date, date, int)
to authenticated, service_role;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
