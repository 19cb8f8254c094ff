-- Invites: the 30-day cap on the expiry itself, and email binding without Unicode folding.
--
-- 1. The cap compared intervals, where PostgreSQL counts a month as 30 days
--    and a year as 360: `interval '1000 years -359970 days'` compares as 30
--    days but lands 5,272 days ahead, `'12 months -330 days'` 35 days,
--    `'1 month'` 31 from the first of December.  What must not pass 30 days
--    is the moment the invite expires, so that is what is compared.
--
-- 2. The bound address was compared after lower(), which folds more than
--    ASCII: U+212A KELVIN SIGN lowers to "k", so `\u212Aate@corp.test`
--    redeemed an invite for kate@corp.test.  Addresses are now compared with
--    ASCII letters folded and nothing else, and the address is the one the
--    signed-in user confirmed (auth.users.email with email_confirmed_at set),
--    not the token's email claim: a claim is what a token says, a confirmed
--    address is what a mailbox proved.

-- Supabase's auth.users has email_confirmed_at.  The plain-PostgreSQL stand-in
-- (kyrie_engine/sql/supabase_standins.sql) did not: add it there only, so a
-- real Supabase project (where the column exists, and auth belongs to
-- supabase_auth_admin) is never touched.  pg_attribute, not
-- information_schema: the latter hides columns the migrating role holds no
-- privilege on, and would send it to ALTER a table it does not own.
do $$
begin
  if not exists (
    select from pg_attribute a
    where a.attrelid = 'auth.users'::regclass and a.attname = 'email_confirmed_at' and not a.attisdropped
  ) then
    alter table auth.users add column email_confirmed_at timestamptz;
  end if;
end
$$;

-- ASCII letters to lower case; every other character unchanged (no Unicode
-- case folding, whatever the database's collation or ctype).
create or replace function kyrie.ascii_lower(p_text text) returns text
language sql
immutable
parallel safe
set search_path = ''
as $$
  select translate(p_text, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')
$$;
revoke execute on function kyrie.ascii_lower(text) from public, anon;

-- The stored form of a bound address was checked as lower(btrim(email)),
-- which under a linguistic collation folds U+212A to "k" and so refused the
-- ASCII-only spelling.  Every value that passed the old check passes this one
-- (lower() leaves no A-Z behind, and ascii_lower changes only A-Z).
alter table public.invites drop constraint invites_email_check;
alter table public.invites add constraint invites_email_check
  check (email is null or email = kyrie.ascii_lower(btrim(email)));

-- The address the signed-in user proved they read: null when they have none
-- confirmed (an email-bound invite then refuses them).
create or replace function kyrie.confirmed_email() returns text
language sql
stable
security definer
set search_path = ''
as $$
  select kyrie.ascii_lower(btrim(u.email))
  from auth.users u
  where u.id = (select auth.uid())
    and u.email_confirmed_at is not null
$$;
revoke execute on function kyrie.confirmed_email() from public, anon, authenticated;

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
  v_user    uuid := auth.uid();
  v_token   text := kyrie.new_invite_token();
  v_expires timestamptz;
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
  -- The expiry, not the interval, is capped (see the top of this file).  An
  -- interval whose sum leaves the timestamp range is refused the same way.
  begin
    v_expires := now() + p_valid_for;
  exception when datetime_field_overflow then
    v_expires := null;
  end;
  if v_expires is null or v_expires <= now() or v_expires > now() + interval '30 days' then
    raise exception 'an invite is valid for more than nothing and at most 30 days' using errcode = '22023';
  end if;

  insert into public.invites (workspace_id, token_hash, role, email, expires_at, created_by)
  values (p_workspace_id, kyrie.invite_token_hash(v_token), p_role,
          nullif(kyrie.ascii_lower(btrim(p_email)), ''), v_expires, v_user);
  return v_token;
end
$$;

-- As in 20261125000003_invites.sql, but the bound address is compared with
-- ASCII case folded only, against the user's confirmed address.  Invites
-- made before this file stored lower(email); for an ASCII address that is the
-- same text, and folding both sides again keeps them comparable.
create or replace function public.redeem_invite(p_token text)
returns table (workspace_id uuid, role text, already_member boolean)
language plpgsql
volatile
security definer
set search_path = ''
as $$
declare
  v_user   uuid := auth.uid();
  v_email  text := kyrie.confirmed_email();
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
  if v_invite.email is not null and kyrie.ascii_lower(v_invite.email) is distinct from v_email then
    raise exception 'this invite was sent to another email address' using errcode = 'KY003',
      hint = 'Sign in with the address the invite was sent to, once it is confirmed.';
  end if;
  -- An invite speaks for the admin who made it, and only while they are one.
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

-- Nothing in kyrie runs for PUBLIC: only the explicit grants above (see the foundation file).
revoke execute on all functions in schema kyrie from public;
