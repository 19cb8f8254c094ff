-- ai_actions: what an analysis proposes, for a member to accept or dismiss.
--
-- Every row belongs to a workspace and to the job that produced it, linked the
-- two ways the app reads: the foreign key `job_id`, and
-- `metadata->>'original_job_id'`.  The key is the database's link; the
-- metadata copy is the app's, and it outlives the job: purging old jobs
-- (kyrie.purge_jobs) sets `job_id` to null but keeps the action and the id of
-- the job that proposed it.
--
-- The engine writes the rows (as the table owner, in the same transaction that
-- completes the job); members read their workspace's actions and may change
-- one column, `status`.  That rule is two rules: a column-level UPDATE grant
-- (the statement is refused when it names any other column) and a policy
-- (the row must be in one of the caller's workspaces, before and after).

create table public.ai_actions (
  id           uuid primary key default gen_random_uuid(),
  workspace_id uuid not null references public.workspaces (id) on delete cascade,
  job_id       uuid references public.jobs (id) on delete set null,
  type         text not null check (type in (
                 'send_invoice', 'flag_budget_overrun', 'renegotiate_rate', 'log_missing_time', 'close_contract'
               )),
  title        text not null check (length(btrim(title)) between 1 and 200),
  reason       text not null check (length(btrim(reason)) between 1 and 4000),
  contract_id  uuid,
  payload      jsonb not null default '{}'::jsonb check (jsonb_typeof(payload) = 'object'),
  metadata     jsonb not null default '{}'::jsonb check (jsonb_typeof(metadata) = 'object'),
  status       text not null default 'proposed' check (status in ('proposed', 'accepted', 'dismissed')),
  decided_by   uuid references auth.users (id) on delete set null,
  decided_at   timestamptz,
  created_at   timestamptz not null default now(),
  updated_at   timestamptz not null default now(),
  -- The contract must be one of the same workspace's: a composite key, so no
  -- action can point across tenants.  When the contract is deleted, only
  -- contract_id is cleared (the column list needs PostgreSQL 15).
  foreign key (contract_id, workspace_id)
    references public.contracts (id, workspace_id) on delete set null (contract_id),
  -- The app's link to the job, always present, and equal to the key while the job exists.
  constraint ai_actions_original_job_id check (
    metadata ? 'original_job_id'
    and (job_id is null or metadata ->> 'original_job_id' = job_id::text)
  )
);
alter table public.ai_actions enable row level security;

comment on table public.ai_actions is
  'Actions proposed by AI analyses (metadata.original_job_id = the job). Members change only status.';

-- The read policy filters on workspace_id; the app lists a workspace's latest.
create index ai_actions_workspace_id_idx on public.ai_actions (workspace_id, created_at desc);
create index ai_actions_job_id_idx on public.ai_actions (job_id);
create index ai_actions_contract_id_idx on public.ai_actions (contract_id, workspace_id);
create index ai_actions_decided_by_idx on public.ai_actions (decided_by);

-- Same reasoning as public.jobs: DEFAULT (the primary key) is what Realtime needs.
alter table public.ai_actions replica identity default;

-- ---------------------------------------------------------------------------
-- Triggers: the job link on insert, bookkeeping on update.

-- Fill metadata.original_job_id from job_id when the writer left it out, and
-- refuse a job of another workspace (jobs has no (id, workspace_id) key to
-- point a composite foreign key at).
create or replace function kyrie.ai_actions_link_job() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_job_workspace uuid;
begin
  if new.job_id is null then
    raise exception 'an ai_action is created by a job: job_id is required' using errcode = '23502';
  end if;
  select j.workspace_id into v_job_workspace from public.jobs j where j.id = new.job_id;
  if v_job_workspace is distinct from new.workspace_id then
    raise exception 'job % does not belong to workspace %', new.job_id, new.workspace_id
      using errcode = '23514';
  end if;
  if not new.metadata ? 'original_job_id' then
    new.metadata := new.metadata || jsonb_build_object('original_job_id', new.job_id);
  end if;
  return new;
end
$$;

create trigger ai_actions_link_job before insert on public.ai_actions
  for each row execute function kyrie.ai_actions_link_job();

-- A member's decision is recorded with who and when.  Runs as the caller; it
-- may set these columns although the caller may not name them, because column
-- privileges apply to the statement, not to what triggers do.
create or replace function kyrie.ai_actions_touch() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  if new.status is distinct from old.status then
    new.decided_at := case when new.status = 'proposed' then null else now() end;
    new.decided_by := case when new.status = 'proposed' then null else auth.uid() end;
  end if;
  return new;
end
$$;

create trigger ai_actions_touch before update on public.ai_actions
  for each row execute function kyrie.ai_actions_touch();

revoke execute on function kyrie.ai_actions_link_job(), kyrie.ai_actions_touch() from public, anon;

-- ---------------------------------------------------------------------------
-- The engine's write: the actions of one job, in the job's workspace (taken
-- from the job row, not from the caller).  The CFO handler calls it in the
-- transaction that completes the job, so actions exist exactly when the job
-- completed.  p_actions: [{id?, type, title, reason, contract_id?, payload?, metadata?}].

create or replace function kyrie.propose_actions(p_job_id uuid, p_actions jsonb)
returns setof public.ai_actions
language sql
set search_path = ''
as $$
  insert into public.ai_actions (id, workspace_id, job_id, type, title, reason, contract_id, payload, metadata)
  select coalesce(a.id, gen_random_uuid()), j.workspace_id, j.id, a.type, a.title, a.reason, a.contract_id,
         coalesce(a.payload, '{}'::jsonb), coalesce(a.metadata, '{}'::jsonb)
  from public.jobs j
  cross join rows from (
    jsonb_to_recordset(p_actions)
      as (id uuid, type text, title text, reason text, contract_id uuid, payload jsonb, metadata jsonb)
  ) with ordinality as a (id, type, title, reason, contract_id, payload, metadata, n)
  where j.id = p_job_id
  order by a.n
  returning *
$$;

revoke execute on function kyrie.propose_actions(uuid, jsonb) from public, anon, authenticated;

-- ---------------------------------------------------------------------------
-- Who may do what.

revoke all on public.ai_actions from public, anon, authenticated, service_role;
grant select on public.ai_actions to authenticated, service_role;
grant update (status) on public.ai_actions to authenticated, service_role;

create policy ai_actions_select_member on public.ai_actions
  for select to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()));

-- Any member may accept or dismiss; WITH CHECK keeps the row in a workspace of
-- theirs (workspace_id cannot change anyway: they may not name it).
create policy ai_actions_update_member on public.ai_actions
  for update to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()))
  with check (workspace_id in (select kyrie.my_workspace_ids()));

-- Realtime: the app's list updates as actions arrive and are decided.
do $$
begin
  if exists (select from pg_publication where pubname = 'supabase_realtime' and not puballtables)
     and not exists (
       select from pg_publication_tables
       where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'ai_actions'
     ) then
    alter publication supabase_realtime add table public.ai_actions;
  end if;
end
$$;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
