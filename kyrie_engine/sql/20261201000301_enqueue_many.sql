-- Many jobs of one kind in one statement, each with its own idempotency key,
-- priority and run_at.
--
-- Why: a caller whose commit answer was lost (a dropped connection, a
-- timeout) does not know whether its batch exists.  With a key per job it
-- sends the same batch again and gets the same ids back, with nothing
-- enqueued twice; without keys it had to choose between losing jobs and
-- duplicating them.  Priorities and run_at per job let one statement carry a
-- mixed batch (PgQueuer's enqueue takes lists of both).
--
-- A new overload rather than a changed kyrie.enqueue_jobs: an applied
-- migration is never edited, and a process of the previous release (a rolling
-- deploy) still calls the eight-argument function, which stays.  This one has
-- nine arguments and no defaults, so a call is never ambiguous between them.
-- NULL arrays mean "none given" (no keys, priority 0, due now).
--
-- Returns one row per payload, in input order: the job's id, and created =
-- false when its key matched an existing job (an earlier batch, or an earlier
-- position of this one), whose id it is.
create or replace function kyrie.enqueue_jobs(
  p_kind             text,
  p_payloads         jsonb[],
  p_workspace_id     uuid,
  p_user_id          uuid,
  p_idempotency_keys text[],
  p_priorities       int[],
  p_run_ats          timestamptz[],
  p_max_attempts     int,
  p_notify           boolean
) returns table (id uuid, created boolean)
language plpgsql
set search_path = ''
as $$
declare
  v_n        int := coalesce(cardinality(p_payloads), 0);
  v_new      uuid[];
  v_inserted uuid[];
  v_ids      uuid[];
  v_created  boolean[];
begin
  if v_n = 0 then
    return;
  end if;
  p_idempotency_keys := coalesce(p_idempotency_keys, array_fill(null::text, array[v_n]));
  p_priorities := coalesce(p_priorities, array_fill(0, array[v_n]));
  p_run_ats := coalesce(p_run_ats, array_fill(null::timestamptz, array[v_n]));
  if cardinality(p_idempotency_keys) <> v_n or cardinality(p_priorities) <> v_n
     or cardinality(p_run_ats) <> v_n then
    raise exception '% payloads but % idempotency keys, % priorities and % run_at values',
      v_n, cardinality(p_idempotency_keys), cardinality(p_priorities), cardinality(p_run_ats)
      using errcode = '22023';
  end if;
  if not p_notify then
    -- Transaction-local: the caller's own transaction ends with this call.
    perform set_config('kyrie.wake_after_commit', 'on', true);
  end if;

  -- Ids chosen up front: RETURNING gives the rows inserted, and a row skipped
  -- by ON CONFLICT is recognised by its id not coming back.
  v_new := array(select gen_random_uuid() from generate_series(1, v_n));
  v_ids := array_fill(null::uuid, array[v_n]);
  v_created := array_fill(false, array[v_n]);
  loop
    with ins as (
      insert into public.jobs as j (id, kind, payload, workspace_id, user_id, idempotency_key,
                                    priority, run_at, max_attempts)
      select p.new_id, p_kind, coalesce(p.payload, '{}'::jsonb), p_workspace_id, p_user_id, p.key,
             coalesce(p.priority, 0), coalesce(p.run_at, now()), coalesce(p_max_attempts, 5)
      from unnest(v_new, p_payloads, p_idempotency_keys, p_priorities, p_run_ats)
             with ordinality as p (new_id, payload, key, priority, run_at, n)
      where v_ids[p.n] is null
      -- Keyed rows in key order: two batches sharing keys (a retry racing the
      -- original) then wait for each other's keys in one order and cannot
      -- deadlock.  Unkeyed rows conflict with nothing and keep input order.
      order by p.key nulls first, p.n
      on conflict (workspace_id, kind, idempotency_key) where idempotency_key is not null do nothing
      returning j.id
    )
    select coalesce(array_agg(ins.id), '{}') into v_inserted from ins;

    -- A new statement, so it sees the rows of concurrent batches that ON
    -- CONFLICT waited for (as kyrie.enqueue_job does).  Two spellings of the
    -- lookup so each uses jobs_idempotency_key_idx; the one-time filters on
    -- p_workspace_id and i.id pick one, or none for a row just inserted.
    select array_agg(coalesce(v_ids[p.n], i.id, e.id) order by p.n),
           array_agg(case when v_ids[p.n] is not null then v_created[p.n] else i.id is not null end
                     order by p.n)
    into v_ids, v_created
    from unnest(v_new, p_idempotency_keys) with ordinality as p (new_id, key, n)
    left join unnest(v_inserted) as i (id) on i.id = p.new_id
    left join lateral (
      select j.id from public.jobs j
      where v_ids[p.n] is null and i.id is null and p_workspace_id is null
        and j.workspace_id is null and j.kind = p_kind and j.idempotency_key = p.key
      union all
      select j.id from public.jobs j
      where v_ids[p.n] is null and i.id is null
        and j.workspace_id = p_workspace_id and j.kind = p_kind and j.idempotency_key = p.key
      limit 1
    ) e on true;

    -- Unresolved: the job that held the key was deleted in between (a purge):
    -- insert those again.
    exit when array_position(v_ids, null) is null;
  end loop;

  return query select r.id, r.created from unnest(v_ids, v_created) as r (id, created);
end
$$;

revoke execute on function
  kyrie.enqueue_jobs(text, jsonb[], uuid, uuid, text[], int[], timestamptz[], int, boolean)
from public, anon, authenticated, service_role;
