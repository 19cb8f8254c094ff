-- Foundation: the tenant tables of KyrieOS and the private schema of the engine.
--
-- Policies and grants live in the next file; Row Level Security is enabled here,
-- in the same statement batch that creates each table, so no table ever exists
-- without it (a table without policies but with RLS denies everything).

-- The engine's internals: queue transitions, policy helpers, views for psql.
-- PostgREST does not expose it (it is not in the API's schema list), so nothing
-- here is reachable from a browser; `authenticated` gets USAGE only because
-- policies call helpers that live here.
create schema if not exists kyrie;
revoke all on schema kyrie from public;
grant usage on schema kyrie to authenticated, service_role;

-- Functions are executable by PUBLIC when created, and a per-schema
-- ALTER DEFAULT PRIVILEGES cannot take that away (it only adds to the
-- global default).  So every file that creates kyrie functions ends with
-- `revoke execute on all functions in schema kyrie from public`, and the
-- roles that need one get an explicit grant.

create or replace function kyrie.touch_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;

-- ---------------------------------------------------------------------------
-- workspaces

create table public.workspaces (
  id          uuid primary key default gen_random_uuid(),
  name        text not null check (length(btrim(name)) between 1 and 200),
  -- Who created it.  Deleting that account must not delete a workspace
  -- that others own by now: the column is cleared instead.
  created_by  uuid default auth.uid() references auth.users (id) on delete set null,
  created_at  timestamptz not null default now(),
  updated_at  timestamptz not null default now()
);
create index workspaces_created_by_idx on public.workspaces (created_by);
alter table public.workspaces enable row level security;

create trigger workspaces_touch before update on public.workspaces
  for each row execute function kyrie.touch_updated_at();

-- ---------------------------------------------------------------------------
-- workspace_members

create table public.workspace_members (
  workspace_id uuid not null references public.workspaces (id) on delete cascade,
  user_id      uuid not null references auth.users (id) on delete cascade,
  role         text not null default 'member' check (role in ('owner', 'admin', 'member')),
  created_at   timestamptz not null default now(),
  primary key (workspace_id, user_id)
);
-- The primary key serves lookups by workspace; policies also look up by user.
create index workspace_members_user_id_idx on public.workspace_members (user_id, workspace_id);
alter table public.workspace_members enable row level security;

-- The creator of a workspace becomes its owner in the same transaction, so a
-- workspace is never without a member who can manage it.  SECURITY DEFINER
-- because the creator is not yet a member and so may not insert members.
create or replace function kyrie.add_creator_as_owner() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into public.workspace_members (workspace_id, user_id, role)
  values (new.id, new.created_by, 'owner')
  on conflict (workspace_id, user_id) do update set role = 'owner';
  return new;
end
$$;
revoke execute on function kyrie.add_creator_as_owner() from public;

create trigger workspaces_add_owner after insert on public.workspaces
  for each row execute function kyrie.add_creator_as_owner();

-- ---------------------------------------------------------------------------
-- invites: only a SHA-256 of the token is stored; the raw token leaves the
-- database once, as the return value of create_invite().

create table public.invites (
  id          uuid primary key default gen_random_uuid(),
  workspace_id uuid not null references public.workspaces (id) on delete cascade,
  token_hash  bytea not null unique check (length(token_hash) = 32),
  role        text not null default 'member' check (role in ('admin', 'member')),
  email       text check (email is null or email = lower(btrim(email))),
  expires_at  timestamptz not null,
  created_by  uuid not null references auth.users (id) on delete cascade,
  created_at  timestamptz not null default now(),
  check (expires_at > created_at)
);
create index invites_workspace_id_idx on public.invites (workspace_id);
create index invites_created_by_idx on public.invites (created_by);
alter table public.invites enable row level security;

-- ---------------------------------------------------------------------------
-- contracts

create table public.contracts (
  id            uuid primary key default gen_random_uuid(),
  workspace_id  uuid not null references public.workspaces (id) on delete cascade,
  client_name   text not null check (length(btrim(client_name)) between 1 and 200),
  title         text not null check (length(btrim(title)) between 1 and 200),
  billing_type  text not null check (billing_type in ('hourly', 'fixed')),
  hourly_rate   numeric(12, 2) check (hourly_rate > 0),
  fixed_fee     numeric(14, 2) check (fixed_fee > 0),
  currency      text not null default 'USD'
                check (currency in ('USD', 'EUR', 'GBP', 'CAD', 'AUD', 'CHF', 'JPY', 'SEK', 'NOK', 'DKK', 'PLN', 'BRL', 'MXN', 'INR', 'NZD', 'SGD', 'ZAR')),
  budget_hours  numeric(10, 2) check (budget_hours > 0),
  start_date    date not null,
  end_date      date,
  status        text not null default 'active'
                check (status in ('draft', 'active', 'paused', 'completed', 'cancelled')),
  created_by    uuid default auth.uid() references auth.users (id) on delete set null,
  created_at    timestamptz not null default now(),
  updated_at    timestamptz not null default now(),
  -- An hourly contract has a rate and no fee; a fixed one a fee and no rate.
  check (
    (billing_type = 'hourly' and hourly_rate is not null and fixed_fee is null)
    or (billing_type = 'fixed' and fixed_fee is not null and hourly_rate is null)
  ),
  check (end_date is null or end_date >= start_date),
  -- Target of the worklogs' composite foreign key (see below).
  unique (id, workspace_id)
);
create index contracts_workspace_id_idx on public.contracts (workspace_id);
create index contracts_created_by_idx on public.contracts (created_by);
alter table public.contracts enable row level security;

create trigger contracts_touch before update on public.contracts
  for each row execute function kyrie.touch_updated_at();

-- ---------------------------------------------------------------------------
-- worklogs: workspace_id is carried on every row so the RLS policy filters on
-- an indexed column of the table itself instead of joining contracts per row;
-- the composite foreign key keeps it equal to the contract's workspace.

create table public.worklogs (
  id           uuid primary key default gen_random_uuid(),
  workspace_id uuid not null references public.workspaces (id) on delete cascade,
  contract_id  uuid not null,
  user_id      uuid not null default auth.uid() references auth.users (id) on delete cascade,
  work_date    date not null,
  hours        numeric(5, 2) not null check (hours > 0 and hours <= 24),
  description  text not null default '' check (length(description) <= 4000),
  billable     boolean not null default true,
  invoiced     boolean not null default false,
  created_at   timestamptz not null default now(),
  updated_at   timestamptz not null default now(),
  foreign key (contract_id, workspace_id)
    references public.contracts (id, workspace_id) on delete cascade,
  check (not invoiced or billable)
);
create index worklogs_workspace_id_idx on public.worklogs (workspace_id, work_date);
create index worklogs_contract_id_idx on public.worklogs (contract_id, workspace_id);
create index worklogs_user_id_idx on public.worklogs (user_id);
alter table public.worklogs enable row level security;

create trigger worklogs_touch before update on public.worklogs
  for each row execute function kyrie.touch_updated_at();

-- ---------------------------------------------------------------------------
-- Membership helpers used by policies.
--
-- A policy on workspace_members that selected from workspace_members would
-- recurse into itself; these functions are SECURITY DEFINER, so the lookup
-- inside them runs as the table owner and skips RLS.  They read the caller's
-- identity from auth.uid() rather than taking a user id, so a caller cannot
-- ask about somebody else.  STABLE lets the planner evaluate them once per
-- statement when wrapped in (select ...).

create or replace function kyrie.workspace_role(ws uuid) returns text
language sql
stable
security definer
set search_path = ''
as $$
  select m.role
  from public.workspace_members m
  where m.workspace_id = ws
    and m.user_id = auth.uid()
$$;

create or replace function kyrie.is_workspace_member(ws uuid) returns boolean
language sql
stable
security definer
set search_path = ''
as $$
  select exists (
    select 1
    from public.workspace_members m
    where m.workspace_id = ws
      and m.user_id = auth.uid()
  )
$$;

create or replace function kyrie.is_workspace_admin(ws uuid) returns boolean
language sql
stable
security definer
set search_path = ''
as $$
  select exists (
    select 1
    from public.workspace_members m
    where m.workspace_id = ws
      and m.user_id = auth.uid()
      and m.role in ('owner', 'admin')
  )
$$;

-- The set of workspaces the caller belongs to, for policies of the form
-- `workspace_id in (select kyrie.my_workspace_ids())`: evaluated once per
-- statement, then an index scan on workspace_id (see the RLS benchmark).
create or replace function kyrie.my_workspace_ids() returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
  select m.workspace_id
  from public.workspace_members m
  where m.user_id = auth.uid()
$$;

revoke execute on function
  kyrie.workspace_role(uuid),
  kyrie.is_workspace_member(uuid),
  kyrie.is_workspace_admin(uuid),
  kyrie.my_workspace_ids()
from public, anon;
grant execute on function
  kyrie.workspace_role(uuid),
  kyrie.is_workspace_member(uuid),
  kyrie.is_workspace_admin(uuid),
  kyrie.my_workspace_ids()
to authenticated, service_role;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
