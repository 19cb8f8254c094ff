-- Row Level Security policies and grants for the tenant tables.
--
-- Shape of every policy:
--   * one policy per command, `to authenticated`: anon has no policy and no
--     grant, so it sees nothing and writes nothing;
--   * membership is `workspace_id in (select kyrie.my_workspace_ids())`: the
--     sub-select is planned as an InitPlan / hashed SubPlan, evaluated once
--     per statement, after which the filter is an index scan on workspace_id
--     (a per-row call of is_workspace_member(workspace_id) would run one
--     lookup per row);
--   * identity is `(select auth.uid())`, evaluated once, never bare auth.uid().
--
-- Grants are explicit and column-level where a policy alone cannot say "this
-- column may not change" (a member renames a workspace but cannot hand it to
-- somebody else by rewriting created_by).  New Supabase projects no longer
-- grant new public tables to the API roles, and older ones grant ALL: the
-- revokes below make both end up the same.
--
-- Decisions where the product note is silent:
--   * any member may rename a workspace (the note: "View/Edit if created_by =
--     auth.uid() OR exists in members"); only its creator deletes it, while
--     still an owner (see the workspaces policies for why created_by alone
--     is not enough);
--   * owners and admins manage members; only an owner grants or takes away
--     the owner role; a workspace keeps at least one owner; anybody but an
--     owner may leave on their own;
--   * members create and edit contracts; only owners and admins delete them
--     (deleting a contract deletes its worklogs);
--   * members log their own time; owners and admins may correct anybody's.

-- ---------------------------------------------------------------------------
-- Helpers (see kyrie.my_workspace_ids in the foundation file for why they are
-- SECURITY DEFINER and read auth.uid() themselves).

create or replace function kyrie.my_admin_workspace_ids() returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
  select m.workspace_id
  from public.workspace_members m
  where m.user_id = auth.uid()
    and m.role in ('owner', 'admin')
$$;

create or replace function kyrie.my_owner_workspace_ids() returns setof uuid
language sql
stable
security definer
set search_path = ''
as $$
  select m.workspace_id
  from public.workspace_members m
  where m.user_id = auth.uid()
    and m.role = 'owner'
$$;

-- True while a workspace has no member yet: only inside the INSERT that
-- creates it, before its after-insert trigger adds the creator as owner.
-- COST 1000 makes the planner test the cheap `created_by` comparison first.
create or replace function kyrie.workspace_is_new(p_workspace_id uuid) returns boolean
language sql
stable
security definer
cost 1000
set search_path = ''
as $$
  select not exists (select from public.workspace_members m where m.workspace_id = p_workspace_id)
$$;

revoke execute on function
  kyrie.my_admin_workspace_ids(), kyrie.my_owner_workspace_ids(), kyrie.workspace_is_new(uuid)
  from public, anon;
grant execute on function
  kyrie.my_admin_workspace_ids(), kyrie.my_owner_workspace_ids(), kyrie.workspace_is_new(uuid)
  to authenticated, service_role;

-- A workspace keeps at least one owner.  A trigger rather than a policy: the
-- rule is about the rows that remain, which a policy on the changed row cannot
-- see.  Cascades (the workspace or the user deleted) are let through.
create or replace function kyrie.keep_an_owner() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if old.role <> 'owner' or (tg_op = 'UPDATE' and new.role = 'owner') then
    return coalesce(new, old);
  end if;
  if not exists (select from public.workspaces w where w.id = old.workspace_id)
     or not exists (select from auth.users u where u.id = old.user_id) then
    return coalesce(new, old);
  end if;
  -- Two owners removing each other at once would each see the other still
  -- there (READ COMMITTED) and leave the workspace ownerless.  Taking the
  -- workspace row's lock queues them; the check below is a new statement,
  -- so the second sees the first's change once it commits.  NO KEY UPDATE
  -- does not conflict with the key-share locks that member inserts take.
  perform 1 from public.workspaces w where w.id = old.workspace_id for no key update;
  if not exists (
    select from public.workspace_members m
    where m.workspace_id = old.workspace_id
      and m.role = 'owner'
      and m.user_id <> old.user_id
  ) then
    raise exception 'a workspace must keep at least one owner'
      using errcode = 'KY010', hint = 'Make another member owner first.';
  end if;
  return coalesce(new, old);
end
$$;
revoke execute on function kyrie.keep_an_owner() from public, anon;

create trigger workspace_members_keep_owner
  before update of role or delete on public.workspace_members
  for each row execute function kyrie.keep_an_owner();

-- ---------------------------------------------------------------------------
-- Grants: nothing for anon; exactly what each policy below needs for
-- authenticated; everything for service_role (it bypasses RLS, as on Supabase).

revoke all on public.workspaces, public.workspace_members, public.invites,
              public.contracts, public.worklogs
  from public, anon, authenticated;

grant all on public.workspaces, public.workspace_members, public.invites,
             public.contracts, public.worklogs
  to service_role;

grant select, delete on public.workspaces to authenticated;
grant insert (id, name, created_by) on public.workspaces to authenticated;
grant update (name) on public.workspaces to authenticated;

grant select, delete on public.workspace_members to authenticated;
grant insert (workspace_id, user_id, role) on public.workspace_members to authenticated;
grant update (role) on public.workspace_members to authenticated;

-- invites: no grant at all; only the invite functions (SECURITY DEFINER) and
-- service_role touch the table, so a token hash never leaves the database.

grant select, delete on public.contracts to authenticated;
grant insert (id, workspace_id, client_name, title, billing_type, hourly_rate, fixed_fee, currency,
              budget_hours, start_date, end_date, status)
  on public.contracts to authenticated;
grant update (client_name, title, billing_type, hourly_rate, fixed_fee, currency, budget_hours,
              start_date, end_date, status)
  on public.contracts to authenticated;

grant select, delete on public.worklogs to authenticated;
grant insert (id, workspace_id, contract_id, user_id, work_date, hours, description, billable, invoiced)
  on public.worklogs to authenticated;
grant update (contract_id, work_date, hours, description, billable, invoiced)
  on public.worklogs to authenticated;

-- ---------------------------------------------------------------------------
-- workspaces

-- The product note says "created_by = auth.uid() OR member".  Taken
-- literally, created_by would be a key that never expires: a creator who
-- handed the workspace over and was then removed by the new owner could still
-- read, rename and delete it.  So the creator's own branch holds only while
-- the workspace has no member at all, which is exactly the moment
-- `insert ... returning` (supabase.from('workspaces').insert().select())
-- needs it: RETURNING is checked against this policy before the after-insert
-- trigger has made the creator an owner.  After that, membership decides.
create policy workspaces_select on public.workspaces
  for select to authenticated
  using (
    id in (select kyrie.my_workspace_ids())
    or (created_by = (select auth.uid()) and kyrie.workspace_is_new(id))
  );

-- Nobody creates a workspace in somebody else's name.
create policy workspaces_insert on public.workspaces
  for insert to authenticated
  with check (created_by = (select auth.uid()));

create policy workspaces_update on public.workspaces
  for update to authenticated
  using (id in (select kyrie.my_workspace_ids()))
  with check (id in (select kyrie.my_workspace_ids()));

-- Only the creator deletes, and only while still an owner of it.
create policy workspaces_delete on public.workspaces
  for delete to authenticated
  using (created_by = (select auth.uid()) and id in (select kyrie.my_owner_workspace_ids()));

-- ---------------------------------------------------------------------------
-- workspace_members (reads of this table inside policies go through the
-- SECURITY DEFINER helpers, which skip RLS: no recursion)

create policy workspace_members_select on public.workspace_members
  for select to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()));

-- Admins add members and admins; only owners add owners.
create policy workspace_members_insert on public.workspace_members
  for insert to authenticated
  with check (
    workspace_id in (select kyrie.my_admin_workspace_ids())
    and (role <> 'owner' or workspace_id in (select kyrie.my_owner_workspace_ids()))
  );

-- USING looks at the row as it is (an admin may not touch an owner's row);
-- WITH CHECK at the row as it becomes (an admin may not make an owner).
create policy workspace_members_update on public.workspace_members
  for update to authenticated
  using (
    workspace_id in (select kyrie.my_admin_workspace_ids())
    and (role <> 'owner' or workspace_id in (select kyrie.my_owner_workspace_ids()))
  )
  with check (
    workspace_id in (select kyrie.my_admin_workspace_ids())
    and (role <> 'owner' or workspace_id in (select kyrie.my_owner_workspace_ids()))
  );

create policy workspace_members_delete on public.workspace_members
  for delete to authenticated
  using (
    (user_id = (select auth.uid()) and role <> 'owner')
    or (
      workspace_id in (select kyrie.my_admin_workspace_ids())
      and (role <> 'owner' or workspace_id in (select kyrie.my_owner_workspace_ids()))
    )
  );

-- ---------------------------------------------------------------------------
-- invites: RLS on, no policy for any API role (see the grants above).

-- ---------------------------------------------------------------------------
-- contracts

create policy contracts_select on public.contracts
  for select to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()));

create policy contracts_insert on public.contracts
  for insert to authenticated
  with check (workspace_id in (select kyrie.my_workspace_ids()));

create policy contracts_update on public.contracts
  for update to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()))
  with check (workspace_id in (select kyrie.my_workspace_ids()));

create policy contracts_delete on public.contracts
  for delete to authenticated
  using (workspace_id in (select kyrie.my_admin_workspace_ids()));

-- ---------------------------------------------------------------------------
-- worklogs.  workspace_id cannot be updated (no column grant) and the
-- composite foreign key keeps it equal to the contract's, so a member cannot
-- move time into another workspace through contract_id either.

create policy worklogs_select on public.worklogs
  for select to authenticated
  using (workspace_id in (select kyrie.my_workspace_ids()));

create policy worklogs_insert on public.worklogs
  for insert to authenticated
  with check (
    workspace_id in (select kyrie.my_workspace_ids())
    and user_id = (select auth.uid())
  );

create policy worklogs_update on public.worklogs
  for update to authenticated
  using (
    workspace_id in (select kyrie.my_workspace_ids())
    and (user_id = (select auth.uid()) or workspace_id in (select kyrie.my_admin_workspace_ids()))
  )
  with check (
    workspace_id in (select kyrie.my_workspace_ids())
    and (user_id = (select auth.uid()) or workspace_id in (select kyrie.my_admin_workspace_ids()))
  );

create policy worklogs_delete on public.worklogs
  for delete to authenticated
  using (
    workspace_id in (select kyrie.my_workspace_ids())
    and (user_id = (select auth.uid()) or workspace_id in (select kyrie.my_admin_workspace_ids()))
  );

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
