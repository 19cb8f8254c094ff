-- An accept in one statement, and the membership rule in one place.
--
-- Before this file, `POST /ai/cfo/analyze` cost eight round trips: workspace
-- exists, begin, set role, set claims, is member, commit, enqueue, wake-up.
-- kyrie.accept_job does the first seven in one statement (the wake-up stays
-- the shared one of kyrie_engine.queue, sent after the commit).
--
-- The membership rule had one spelling, kyrie.is_workspace_member(ws), for the
-- signed-in user (auth.uid()).  The engine acts for a user it names, without
-- being signed in as them; rather than pretending to be them (SET ROLE and
-- claims: four round trips) it asks the same rule with the user as an
-- argument.  kyrie.is_member_of is that rule, and is_workspace_member is now
-- defined through it, so the two cannot drift apart.

-- True when p_user_id has a row in the workspace's members, whatever its role.
-- SECURITY DEFINER: the members table's policy would recurse (see the
-- foundation file).  Unlike is_workspace_member, it answers for anyone, so it
-- is the engine's alone: no grant to authenticated, who could otherwise probe
-- who belongs to which workspace.
create or replace function kyrie.is_member_of(p_workspace_id uuid, p_user_id uuid) returns boolean
language sql
stable
security definer
set search_path = ''
as $$
  select exists (
    select 1
    from public.workspace_members m
    where m.workspace_id = p_workspace_id
      and m.user_id = p_user_id
  )
$$;

revoke execute on function kyrie.is_member_of(uuid, uuid) from public, anon, authenticated;

create or replace function kyrie.is_workspace_member(ws uuid) returns boolean
language sql
stable
security definer
set search_path = ''
as $$
  select kyrie.is_member_of(ws, (select auth.uid()))
$$;

-- Accept one job for a user: refuse when the workspace does not exist or the
-- user is not one of its members, else enqueue through kyrie.enqueue_job (the
-- one insert of a job, idempotency included).
--
-- The refusal is a value (outcome), not an exception: the API maps each
-- outcome to its status (404, 403) without parsing error text, and a refused
-- call inserts nothing.  p_notify => false: the caller's statement is its own
-- transaction, so the wake-up is sent after the commit and shared between
-- concurrent accepts (kyrie_engine.queue), not one NOTIFY per commit.
--
-- The membership is read when the statement runs; a member removed just
-- afterwards still has the job accepted, and the handler asks again as the
-- user before reading anything (kyrie_engine.agents.figures).
create or replace function kyrie.accept_job(
  p_kind            text,
  p_payload         jsonb,
  p_workspace_id    uuid,
  p_user_id         uuid,
  p_idempotency_key text default null
) returns table (outcome text, job_id uuid, created boolean)
language plpgsql
volatile
set search_path = ''
as $$
begin
  if p_workspace_id is null or p_user_id is null then
    raise exception 'a job is accepted for a workspace and a user' using errcode = '22004';
  end if;
  if not exists (select from public.workspaces w where w.id = p_workspace_id) then
    return query select 'workspace_not_found'::text, null::uuid, false;
    return;
  end if;
  if not kyrie.is_member_of(p_workspace_id, p_user_id) then
    return query select 'not_a_member'::text, null::uuid, false;
    return;
  end if;
  return query
    select 'accepted'::text, e.id, e.created
    from kyrie.enqueue_job(p_kind, p_payload, p_workspace_id, p_user_id, p_idempotency_key,
                           p_notify => false) e;
end
$$;

revoke execute on function kyrie.accept_job(text, jsonb, uuid, uuid, text) from public, anon, authenticated;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
