-- Durable model calls, token usage, and what the console shows of the budget (issue 13).
--
-- kyrie.model_calls: every model response, stored with its job and keyed by
-- its place in the conversation (seq: the n-th request of the attempt) and
-- the SHA-256 of the request.  An attempt that follows a crash asks the
-- store first: the same request at the same place is answered from here and
-- never sent again; a changed request (different hash) goes out.
--
-- OPERATOR-ONLY: the requests and responses hold prompts, which hold other
-- people's worklog text.  No grant to authenticated, anon or service_role,
-- no policy: the engine's own role (the owner) and superusers read it.
--
-- Retention: the calls belong to their job (on delete cascade), so
-- kyrie.purge_finished_jobs and kyrie.purge_jobs remove them with it.  Usage
-- rows (kyrie.model_usage) have no foreign key and stay: they are what
-- billing and the owner's budget are computed from, they hold no text, and
-- a purged job must not make a month's bill smaller.

create table kyrie.model_calls (
  job_id         uuid not null references public.jobs (id) on delete cascade,
  seq            int not null check (seq >= 0),
  request_hash   bytea not null check (length(request_hash) = 32),
  attempt        int not null,
  model          text not null,
  response       jsonb not null,
  prompt_tokens  int not null default 0,
  completion_tokens int not null default 0,
  created_at     timestamptz not null default clock_timestamp(),
  -- The primary key's first column is job_id: it is also the foreign key's index.
  primary key (job_id, seq, request_hash)
);

comment on table kyrie.model_calls is
  'Stored model responses for replay after a crash. Operator-only: prompts contain other people''s worklog text.';

revoke all on kyrie.model_calls from public, anon, authenticated, service_role;

-- Tokens as they are spent: one row per response the provider sent (failed
-- attempts included; a replayed answer adds nothing, so each token counts
-- once).  No foreign key to jobs on purpose (see above); workspace_id is
-- copied from the job when the row is written.
create table kyrie.model_usage (
  id                bigint generated always as identity primary key,
  job_id            uuid not null,
  workspace_id      uuid,
  model             text not null,
  attempt           int not null,
  seq               int not null,
  prompt_tokens     int not null,
  completion_tokens int not null,
  total_tokens      int generated always as (prompt_tokens + completion_tokens) stored,
  spent_at          timestamptz not null default clock_timestamp()
);

create index model_usage_workspace_day on kyrie.model_usage (workspace_id, spent_at);
create index model_usage_model_time on kyrie.model_usage (model, spent_at);

comment on table kyrie.model_usage is
  'Tokens spent, one row per provider response; kept when jobs are purged (billing). '
  'Owners and admins read their workspace''s rows (RLS), operators everything.';

-- Owners and admins see their workspace's usage (billing and the owner's
-- budget are theirs to watch); members do not.  RLS, so the same rule holds
-- for PostgREST, psql as `authenticated`, and the view below.
alter table kyrie.model_usage enable row level security;

create or replace function kyrie.my_admin_workspace_ids() returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
  select m.workspace_id
  from public.workspace_members m
  where m.user_id = (select auth.uid())
    and m.role in ('owner', 'admin')
$$;

revoke execute on function kyrie.my_admin_workspace_ids() from public, anon;
grant execute on function kyrie.my_admin_workspace_ids() to authenticated;

create policy model_usage_select on kyrie.model_usage
  for select to authenticated
  using (workspace_id in (select kyrie.my_admin_workspace_ids()));

revoke all on kyrie.model_usage from public, anon, authenticated, service_role;
grant select on kyrie.model_usage to authenticated;

-- Token usage per workspace, day (UTC) and model: what the app shows an
-- owner and what billing reads.  security_invoker, so the caller's RLS
-- applies (owners and admins: their workspaces; operators: all).
create or replace view public.workspace_token_usage with (security_invoker = true) as
select u.workspace_id,
       (u.spent_at at time zone 'UTC')::date as day,
       u.model,
       count(*) as requests,
       sum(u.prompt_tokens) as prompt_tokens,
       sum(u.completion_tokens) as completion_tokens,
       sum(u.total_tokens) as total_tokens
from kyrie.model_usage u
group by 1, 2, 3;

revoke all on public.workspace_token_usage from public, anon, authenticated, service_role;
grant select on public.workspace_token_usage to authenticated;

-- The stored answer for this request at this place of this job's
-- conversation, or null (then the request goes to the provider).
create or replace function kyrie.replay_model_call(p_job_id uuid, p_seq int, p_request_hash bytea)
returns jsonb
language sql
stable
set search_path = ''
as $$
  select c.response
  from kyrie.model_calls c
  where c.job_id = p_job_id and c.seq = p_seq and c.request_hash = p_request_hash
$$;

-- A response arrived: store it for replay and count its tokens, in one
-- statement.  The usage row is written even when the store already holds
-- this call (two attempts racing after a lease expiry both paid for it).
create or replace function kyrie.record_model_call(
  p_job_id uuid,
  p_attempt int,
  p_seq int,
  p_request_hash bytea,
  p_model text,
  p_response jsonb,
  p_prompt_tokens int,
  p_completion_tokens int
) returns void
language sql
set search_path = ''
as $$
  with stored as (
    insert into kyrie.model_calls
      (job_id, seq, request_hash, attempt, model, response, prompt_tokens, completion_tokens)
    values (p_job_id, p_seq, p_request_hash, p_attempt, p_model, p_response, p_prompt_tokens, p_completion_tokens)
    on conflict do nothing
  )
  insert into kyrie.model_usage (job_id, workspace_id, model, attempt, seq, prompt_tokens, completion_tokens)
  select p_job_id, (select j.workspace_id from public.jobs j where j.id = p_job_id), p_model, p_attempt, p_seq,
         p_prompt_tokens, p_completion_tokens
$$;

revoke execute on function
  kyrie.replay_model_call(uuid, int, bytea),
  kyrie.record_model_call(uuid, int, int, bytea, text, jsonb, int, int)
from public, anon, authenticated, service_role;

-- For the operator console and psql: each model's limits, what is left now,
-- and what was spent in the current window and day (from kyrie.model_usage,
-- which only counts answered requests).
create or replace view kyrie.model_budget_status with (security_invoker = true) as
select b.model,
       b.window_seconds,
       b.rpm, b.tpm, b.rpd, b.tpd,
       floor(kyrie.budget_refill(b.requests_left, b.rpm, b.window_seconds,
             extract(epoch from clock_timestamp() - b.refilled_at), b.headroom, b.in_flight))::int as requests_left,
       floor(kyrie.budget_refill(b.tokens_left, b.tpm, b.window_seconds,
             extract(epoch from clock_timestamp() - b.refilled_at), b.headroom, b.in_flight_tokens))::int
         as tokens_left,
       b.headroom,
       b.in_flight,
       u.window_requests as requests_used_window,
       u.window_tokens as tokens_used_window,
       u.day_requests as requests_used_day,
       u.day_tokens as tokens_used_day,
       case when b.blocked_until > clock_timestamp() then b.blocked_until end as blocked_until,
       b.headers_seen_at
from kyrie.model_budgets b
left join lateral (
  select count(*) filter (where m.spent_at > clock_timestamp() - make_interval(secs => b.window_seconds))
           as window_requests,
         coalesce(sum(m.total_tokens) filter (
           where m.spent_at > clock_timestamp() - make_interval(secs => b.window_seconds)), 0) as window_tokens,
         count(*) as day_requests,
         coalesce(sum(m.total_tokens), 0) as day_tokens
  from kyrie.model_usage m
  where m.model = b.model
    and m.spent_at > clock_timestamp() - make_interval(secs => b.window_seconds * 1440)
) u on true;

-- A per-minute series of the last day's spending, for the console to chart.
create or replace view kyrie.model_token_series with (security_invoker = true) as
select m.model,
       date_trunc('minute', m.spent_at) as minute,
       count(*) as requests,
       sum(m.total_tokens) as tokens
from kyrie.model_usage m
where m.spent_at > clock_timestamp() - interval '1 day'
group by 1, 2;

revoke all on kyrie.model_budget_status, kyrie.model_token_series from public, anon, authenticated, service_role;
