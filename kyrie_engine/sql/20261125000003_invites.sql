-- Invites, only through functions.
--
-- Nobody selects public.invites (no grant, no policy): the three functions
-- below are the whole interface.  The raw token exists once, as the return
-- value of create_invite(); the table keeps its SHA-256, so a leaked backup or
-- a curious admin cannot redeem anything.
--
-- Errors the app maps to messages (SQLSTATE, then PostgREST's HTTP status 400
-- for the custom codes, 403 for 42501):
--   42501  not signed in, or not an owner/admin of the workspace
--   22023  bad argument (role, validity)
--   KY001  the token matches no invite (wrong, or already used)
--   KY002  the invite has expired
--   KY003  the invite is bound to another email address
-- Raising aborts the caller's transaction, so a refused redemption changes
-- nothing: the invite stays as it was.

-- 64 hex characters: two v4 UUIDs give 244 random bits from the server's
-- strong random source (gen_random_uuid is core since PostgreSQL 13, so no
-- pgcrypto, which Supabase keeps in another schema).
create or replace function kyrie.new_invite_token() returns text
language sql
volatile
set search_path = ''
as $$
  select replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')
$$;
revoke execute on function kyrie.new_invite_token() from public, anon;

create or replace function kyrie.invite_token_hash(p_token text) returns bytea
language sql
immutable
set search_path = ''
as $$
  select sha256(convert_to(coalesce(p_token, ''), 'UTF8'))
$$;
revoke execute on function kyrie.invite_token_hash(text) from public, anon;

-- ---------------------------------------------------------------------------

create or replace function public.create_invite(
  p_workspace_id uuid,
  p_role         text default 'member',
  p_email        text default null,
  p_valid_for    interval default interval '7 days'
) returns text
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_user  uuid := auth.uid();
  v_token text := kyrie.new_invite_token();
begin
  if v_user is null then
    raise exception 'sign in to invite people' using errcode = '42501';
  end if;
  if not kyrie.is_workspace_admin(p_workspace_id) then
    raise exception 'only owners and admins of this workspace can invite people' using errcode = '42501';
  end if;
  if p_role is null or p_role not in ('admin', 'member') then
    raise exception 'an invite''s role is admin or member' using errcode = '22023';
  end if;
  if p_valid_for is null or p_valid_for <= interval '0' or p_valid_for > interval '30 days' then
    raise exception 'an invite is valid for more than nothing and at most 30 days' using errcode = '22023';
  end if;

  insert into public.invites (workspace_id, token_hash, role, email, expires_at, created_by)
  values (p_workspace_id, kyrie.invite_token_hash(v_token), p_role,
          nullif(lower(btrim(p_email)), ''), now() + p_valid_for, v_user);
  return v_token;
end
$$;

-- What the invite page shows, before the visitor signs in (so anon may call
-- it; a token is 244 random bits, not guessable).  Nothing about who else is
-- in the workspace, and not the bound email address.  A wrong token returns
-- no row rather than an error, so the page says "invalid link" either way.
create or replace function public.get_invite_by_token(p_token text)
returns table (workspace_name text, role text, expires_at timestamptz, is_valid boolean)
language sql
stable
security definer
set search_path = ''
as $$
  select w.name, i.role, i.expires_at, i.expires_at > now()
  from public.invites i
  join public.workspaces w on w.id = i.workspace_id
  where i.token_hash = kyrie.invite_token_hash(p_token)
$$;

-- Insert the member and delete the invite, in one transaction.
--
-- Single use under concurrency: the DELETE takes the invite's row lock, so of
-- two concurrent redemptions the second waits, then finds the row gone
-- (READ COMMITTED re-checks the row after the first commits) and gets KY001.
-- A refusal (expired, wrong email) raises after the DELETE, which rolls it
-- back: the invite survives for the right person.
--
-- Already a member: the invite is used up and the membership is left as it
-- is (never a silent promotion or demotion); already_member tells the app.
create or replace function public.redeem_invite(p_token text)
returns table (workspace_id uuid, role text, already_member boolean)
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_user   uuid := auth.uid();
  v_email  text := lower(btrim(auth.email()));
  v_invite public.invites;
  v_role   text;
begin
  if v_user is null then
    raise exception 'sign in to accept the invite' using errcode = '42501';
  end if;

  delete from public.invites i
  where i.token_hash = kyrie.invite_token_hash(p_token)
  returning i.* into v_invite;

  if not found then
    raise exception 'this invite link is not valid or was already used' using errcode = 'KY001';
  end if;
  if v_invite.expires_at <= now() then
    raise exception 'this invite has expired' using errcode = 'KY002',
      hint = 'Ask for a new invite.';
  end if;
  if v_invite.email is not null and v_invite.email is distinct from v_email then
    raise exception 'this invite was sent to another email address' using errcode = 'KY003',
      hint = 'Sign in with the address the invite was sent to.';
  end if;
  -- An invite speaks for the admin who made it, and only while they are one:
  -- otherwise an admin removed by the owner (or demoted) could walk back in
  -- with a link they made beforehand.  (The trigger below also deletes such
  -- links; this covers any made before it existed.)
  if not exists (
    select from public.workspace_members m
    where m.workspace_id = v_invite.workspace_id
      and m.user_id = v_invite.created_by
      and m.role in ('owner', 'admin')
  ) then
    raise exception 'this invite link is not valid or was already used' using errcode = 'KY001';
  end if;

  insert into public.workspace_members as m (workspace_id, user_id, role)
  values (v_invite.workspace_id, v_user, v_invite.role)
  on conflict on constraint workspace_members_pkey do nothing
  returning m.role into v_role;

  if v_role is not null then
    return query select v_invite.workspace_id, v_role, false;
  else
    return query
      select m.workspace_id, m.role, true
      from public.workspace_members m
      where m.workspace_id = v_invite.workspace_id and m.user_id = v_user;
  end if;
end
$$;

-- An owner or admin withdraws every pending invite of a workspace (a link
-- leaked, a hire cancelled).  Returns how many were withdrawn.
create or replace function public.revoke_invites(p_workspace_id uuid)
returns integer
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_count integer;
begin
  if not kyrie.is_workspace_admin(p_workspace_id) then
    raise exception 'only owners and admins can withdraw invites' using errcode = '42501';
  end if;
  delete from public.invites i where i.workspace_id = p_workspace_id;
  get diagnostics v_count = row_count;
  return v_count;
end
$$;

-- When someone stops being an owner or admin of a workspace (removed, left,
-- or demoted to member), the invites they made there are withdrawn.
create or replace function kyrie.withdraw_invites_of_former_admin() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if tg_op = 'DELETE' or new.role = 'member' then
    delete from public.invites i
    where i.workspace_id = old.workspace_id and i.created_by = old.user_id;
  end if;
  return null;
end
$$;
revoke execute on function kyrie.withdraw_invites_of_former_admin() from public, anon;

create trigger workspace_members_withdraw_invites
  after update of role or delete on public.workspace_members
  for each row
  when (old.role in ('owner', 'admin'))
  execute function kyrie.withdraw_invites_of_former_admin();

revoke execute on function
  public.revoke_invites(uuid),
  public.create_invite(uuid, text, text, interval),
  public.get_invite_by_token(text),
  public.redeem_invite(text)
from public, anon;

grant execute on function public.create_invite(uuid, text, text, interval) to authenticated, service_role;
grant execute on function public.redeem_invite(text) to authenticated, service_role;
grant execute on function public.revoke_invites(uuid) to authenticated, service_role;
-- The one function anon may call: the invite page before sign-in.
grant execute on function public.get_invite_by_token(text) to anon, authenticated, service_role;

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
