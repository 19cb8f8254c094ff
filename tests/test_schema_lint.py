"""A schema lint of our own, run against the catalogs of the migrated database.

Each rule is a query returning the offending objects (empty = clean), checked
twice: against the real schema (must be empty), and against a deliberately bad
object created in the test's own database (must be caught), so that a rule
broken by a typo cannot pass silently forever.

Rules (the "traps already known" of docs/DESIGN, made executable):
  * every table in `public` has Row Level Security enabled;
  * a policy never calls auth.uid() / auth.jwt() / auth.role() / auth.email()
    bare (evaluated per row) instead of as `(select auth.uid())` (once per statement);
  * a SECURITY DEFINER function in `public` or `kyrie` pins `search_path=''`
    and is not executable by `anon`, unless allow-listed;
  * every foreign key has an index whose leading columns are the key's columns
    (else a delete of the parent scans the child, and policies filter unindexed).
"""

from __future__ import annotations

import re

import asyncpg

LINTED_SCHEMAS = ["public", "kyrie"]
ANON_MAY_EXECUTE = {"public.get_invite_by_token(p_token text)"}

_TABLES_WITHOUT_RLS = """
select c.oid::regclass::text as name
from pg_class c
where c.relnamespace = 'public'::regnamespace
  and c.relkind in ('r', 'p')
  and not c.relrowsecurity
order by 1
"""

_POLICIES = """
select format('%I.%I: %I', p.schemaname, p.tablename, p.policyname) as name,
       coalesce(p.qual, '') || ' ' || coalesce(p.with_check, '') as text
from pg_policies p
order by 1
"""

_SECURITY_DEFINER = """
select p.oid::regprocedure::text as signature,
       format('%s.%s(%s)', n.nspname, p.proname, pg_get_function_identity_arguments(p.oid)) as name,
       coalesce('search_path=""' = any(p.proconfig), false) as pinned,
       has_function_privilege('anon', p.oid, 'execute') as anon_executes
from pg_proc p
join pg_namespace n on n.oid = p.pronamespace
where p.prosecdef
  and n.nspname = any($1::text[])
order by 2
"""

# An index serves a foreign key when its first n key columns are the key's n
# columns, in any order; partial and invalid indexes do not count.
_FOREIGN_KEYS_WITHOUT_INDEX = """
select format('%s.%s (%s)', c.conrelid::regclass, c.conname,
              (select string_agg(a.attname, ', ' order by k.ord)
               from unnest(c.conkey) with ordinality k(attnum, ord)
               join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum)) as name
from pg_constraint c
join pg_class t on t.oid = c.conrelid
where c.contype = 'f'
  and t.relnamespace::regnamespace::text = any($1::text[])
  and not exists (
    select from pg_index i
    where i.indrelid = c.conrelid
      and i.indisvalid
      and i.indpred is null
      and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] @> c.conkey
      and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] <@ c.conkey
  )
order by 1
"""

_AUTH_CALL = re.compile(r"\bauth\.(uid|jwt|role|email)\(\)")


def bare_auth_calls(text: str) -> list[str]:
    """auth.*() calls not directly inside a sub-select, in pg_policies' deparsed text.

    Deparsed, `(select auth.uid())` reads `( SELECT auth.uid() AS uid)` and
    `(select auth.jwt() ->> 'x')` reads `( SELECT (auth.jwt() ->> 'x'::text))`:
    wrapped means the text before the call, opening parentheses aside, ends in SELECT.
    """
    bare = []
    for match in _AUTH_CALL.finditer(text):
        before = text[: match.start()].rstrip(" (\n\t")
        if not re.search(r"\bSELECT$", before, re.IGNORECASE):
            bare.append(match.group(0))
    return bare


async def tables_without_rls(db: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await db.fetch(_TABLES_WITHOUT_RLS)]


async def policies_with_bare_auth_calls(db: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await db.fetch(_POLICIES) if bare_auth_calls(r["text"])]


async def definers_without_search_path(db: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await db.fetch(_SECURITY_DEFINER, LINTED_SCHEMAS) if not r["pinned"]]


async def definers_anon_may_execute(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch(_SECURITY_DEFINER, LINTED_SCHEMAS)
    return [r["name"] for r in rows if r["anon_executes"] and r["name"] not in ANON_MAY_EXECUTE]


async def foreign_keys_without_index(db: asyncpg.Connection) -> list[str]:
    return [r["name"] for r in await db.fetch(_FOREIGN_KEYS_WITHOUT_INDEX, LINTED_SCHEMAS)]


# ---------------------------------------------------------------------------
# The real schema


async def test_every_public_table_has_rls(db: asyncpg.Connection) -> None:
    assert await tables_without_rls(db) == []


async def test_policies_wrap_auth_calls_in_select(db: asyncpg.Connection) -> None:
    assert await db.fetchval("select count(*) from pg_policies") > 0
    assert await policies_with_bare_auth_calls(db) == []


async def test_security_definer_functions_pin_search_path(db: asyncpg.Connection) -> None:
    assert await db.fetch(_SECURITY_DEFINER, LINTED_SCHEMAS), "no SECURITY DEFINER function found at all"
    assert await definers_without_search_path(db) == []


async def test_anon_executes_only_allow_listed_security_definer_functions(db: asyncpg.Connection) -> None:
    assert await definers_anon_may_execute(db) == []
    # The allow-list is not stale: what it names exists and anon really may call it.
    names = {r["name"]: r["anon_executes"] for r in await db.fetch(_SECURITY_DEFINER, LINTED_SCHEMAS)}
    assert {name: names.get(name) for name in ANON_MAY_EXECUTE} == dict.fromkeys(ANON_MAY_EXECUTE, True)


async def test_no_engine_function_is_executable_by_public(db: asyncpg.Connection) -> None:
    """The kyrie schema is the engine's: every function there is granted by name or to nobody.
    (A per-schema ALTER DEFAULT PRIVILEGES cannot revoke PUBLIC's default EXECUTE.)"""
    open_to_public = await db.fetch(
        """
        select p.oid::regprocedure::text as name
        from pg_proc p
        where p.pronamespace = 'kyrie'::regnamespace
          and exists (select from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
                      where a.grantee = 0 and a.privilege_type = 'EXECUTE')
        """
    )
    assert [r["name"] for r in open_to_public] == []


async def test_every_foreign_key_has_an_index(db: asyncpg.Connection) -> None:
    assert await db.fetchval("select count(*) from pg_constraint where contype = 'f'") > 0
    assert await foreign_keys_without_index(db) == []


# ---------------------------------------------------------------------------
# Self-tests: a bad object of each kind is caught, and its fixed twin is not.


async def test_lint_catches_a_table_without_rls(db: asyncpg.Connection) -> None:
    await db.execute("create table public.lint_open (id int primary key)")
    await db.execute("create table public.lint_closed (id int primary key)")
    await db.execute("alter table public.lint_closed enable row level security")
    assert await tables_without_rls(db) == ["lint_open"]


async def test_lint_catches_a_bare_auth_call_in_a_policy(db: asyncpg.Connection) -> None:
    await db.execute("create table public.lint_owned (owner uuid, claims jsonb)")
    await db.execute("alter table public.lint_owned enable row level security")
    await db.execute("create policy bare_select on public.lint_owned for select using (owner = auth.uid())")
    await db.execute("create policy bare_check on public.lint_owned for insert "
                     "with check (owner = (select auth.uid()) and claims = auth.jwt())")
    await db.execute("create policy wrapped on public.lint_owned for update "
                     "using (owner = (select auth.uid()) and (select auth.jwt() ->> 'role') = 'x') "
                     "with check ((select auth.role()) = 'authenticated')")
    assert await policies_with_bare_auth_calls(db) == [
        "public.lint_owned: bare_check", "public.lint_owned: bare_select"
    ]


def test_bare_auth_call_parser() -> None:
    assert bare_auth_calls("(owner = auth.uid())") == ["auth.uid()"]
    assert bare_auth_calls("(owner = ( SELECT auth.uid() AS uid))") == []
    assert bare_auth_calls("(( SELECT (auth.jwt() ->> 'role'::text)) = 'x'::text)") == []
    mixed = "(kyrie.f(auth.email()) and ( SELECT auth.role() AS role) = 'a')"
    assert bare_auth_calls(mixed) == ["auth.email()"]


async def test_lint_catches_security_definer_without_search_path(db: asyncpg.Connection) -> None:
    await db.execute("create function kyrie.lint_unpinned() returns int language sql security definer "
                     "as 'select 1'")
    await db.execute("create function kyrie.lint_other_path() returns int language sql security definer "
                     "set search_path = public as 'select 1'")
    await db.execute("create function kyrie.lint_pinned() returns int language sql security definer "
                     "set search_path = '' as 'select 1'")
    assert await definers_without_search_path(db) == ["kyrie.lint_other_path()", "kyrie.lint_unpinned()"]


async def test_lint_catches_security_definer_anon_may_execute(db: asyncpg.Connection) -> None:
    # Functions are executable by PUBLIC unless revoked: the mistake this rule exists for.
    await db.execute("create function public.lint_open(p int) returns int language sql security definer "
                     "set search_path = '' as 'select p'")
    await db.execute("create function public.lint_closed(p int) returns int language sql security definer "
                     "set search_path = '' as 'select p'")
    await db.execute("revoke execute on function public.lint_closed(int) from public, anon")
    await db.execute("create function public.lint_granted() returns int language sql security definer "
                     "set search_path = '' as 'select 1'")
    await db.execute("revoke execute on function public.lint_granted() from public")
    await db.execute("grant execute on function public.lint_granted() to anon")
    assert await definers_anon_may_execute(db) == ["public.lint_granted()", "public.lint_open(p integer)"]


async def test_lint_catches_a_foreign_key_without_index(db: asyncpg.Connection) -> None:
    await db.execute("""
        create table public.lint_child (
          id uuid primary key,
          workspace_id uuid not null references public.workspaces (id),
          contract_id uuid,
          user_id uuid references auth.users (id),
          owner_id uuid references auth.users (id),
          foreign key (contract_id, workspace_id) references public.contracts (id, workspace_id)
        )
    """)
    # Serves workspace_id, not the composite key (its second column is not the key's).
    await db.execute("create index on public.lint_child (workspace_id, id)")
    # A partial index does not serve user_id.
    await db.execute("create index on public.lint_child (user_id) where user_id is not null")
    await db.execute("create index on public.lint_child (owner_id, id)")
    assert await foreign_keys_without_index(db) == [
        "lint_child.lint_child_contract_id_workspace_id_fkey (contract_id, workspace_id)",
        "lint_child.lint_child_user_id_fkey (user_id)",
    ]
