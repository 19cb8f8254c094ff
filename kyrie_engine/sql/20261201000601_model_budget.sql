-- One model budget for every worker and process (issue 13).
--
-- Groq's limits belong to the organisation: requests and tokens per minute
-- and per day.  Each model's budget is one row here, and every request first
-- takes its share from it in one call (kyrie.take_model_budget), so a fleet
-- of workers paces itself instead of learning the limit by hitting it.
--
-- The budget is four token buckets per model (requests and tokens, per
-- window and per day), refilled continuously at limit / period.  Buckets and
-- not fixed windows, because a request is taken from the budget a few
-- milliseconds before Groq counts it: with fixed windows a grant just before
-- a boundary lands in Groq's next window and overfills it; with buckets a
-- later deduction never leaves the provider's bucket lower than ours.
--
-- Limits come from settings (kyrie.seed_model_budget, at a worker's first
-- job) and are corrected by every response's headers
-- (kyrie.settle_model_call): Groq reports the day's requests and the
-- minute's tokens; RPM and TPD are only known from settings.  A null limit
-- is unknown and does not hold a request back.
--
-- The window is a column (60 s in production) so that a test can compress
-- time; the day is 1440 windows.
--
-- In flight, and headroom: a request is taken from our bucket before the
-- provider counts it.  While the provider's bucket is full, the refill it
-- would have had during that gap is lost to it but not to ours, so a bucket
-- of ours that refills to the limit with k requests in flight is k requests
-- ahead of the provider's when they land (measured: 2-3 429s in 120
-- requests at 5 requests/s).  So the minute buckets refill only up to the
-- limit, less a headroom (5%), less what is in flight (taken, not settled).
-- The rate is unchanged: only the burst is smaller.  A worker killed between
-- take and settle leaves its request counted in flight: the count is
-- forgotten once nothing changed it for a window plus the client's 60 s
-- timeout (every request still out then has timed out).

create table kyrie.model_budgets (
  model              text primary key,
  window_seconds     double precision not null default 60 check (window_seconds > 0),
  rpm                int check (rpm > 0),
  tpm                int check (tpm > 0),
  rpd                int check (rpd > 0),
  tpd                int check (tpd > 0),
  -- What is left in each bucket at refilled_at (null while its limit is unknown).
  -- Tokens may go below zero: a response that used more than its estimate
  -- puts the bucket in debt, and the next calls wait it out.
  requests_left      double precision,
  tokens_left        double precision,
  day_requests_left  double precision,
  day_tokens_left    double precision,
  refilled_at        timestamptz not null default clock_timestamp(),
  -- After a 429 nothing is granted before this (the provider's retry-after).
  blocked_until      timestamptz,
  headroom           double precision not null default 0.05 check (headroom >= 0 and headroom < 1),
  in_flight          int not null default 0,
  in_flight_tokens   bigint not null default 0,
  in_flight_at       timestamptz,
  -- The last response's headers, as Groq sent them (for the status view).
  headers_seen_at    timestamptz,
  tokens_reset_at    timestamptz,
  requests_reset_at  timestamptz
);

comment on table kyrie.model_budgets is
  'Per model, the provider''s limits and what is left of them now; operator-only (the engine and psql).';

revoke all on kyrie.model_budgets from public, anon, authenticated, service_role;

-- A bucket refilled for `elapsed` seconds: null while the limit is unknown;
-- a bucket never seen (left null) starts full; full is the limit less the headroom.
create or replace function kyrie.budget_refill(
  p_left double precision, p_limit int, p_period double precision, p_elapsed double precision,
  p_headroom double precision default 0, p_in_flight double precision default 0
) returns double precision
language sql
immutable
set search_path = ''
as $$
  select case when p_limit is null then null
              else least(greatest(p_left, p_limit * (1 - p_headroom) - p_in_flight),
                         coalesce(p_left, p_limit * (1 - p_headroom)) + p_elapsed * p_limit / p_period)
         end
$$;

-- Seconds until a bucket holds `p_cost` (0 when it does, or its limit is unknown).
-- A cost above the limit is capped at the limit: a request bigger than the
-- whole minute still goes once the bucket is full (the provider judges it).
create or replace function kyrie.budget_wait(
  p_level double precision, p_limit int, p_period double precision, p_cost double precision,
  p_headroom double precision default 0
) returns double precision
language sql
immutable
set search_path = ''
as $$
  select case when p_limit is null or p_level >= least(p_cost, p_limit * (1 - p_headroom)) then 0
              else (least(p_cost, p_limit * (1 - p_headroom)) - p_level) * p_period / p_limit
         end
$$;

-- Seed (or change) a model's limits from settings.  A null argument leaves
-- that limit as it is, so headers learned earlier are not forgotten when a
-- worker starts without an opinion; a lowered limit clamps what is left.
create or replace function kyrie.seed_model_budget(
  p_model text,
  p_rpm int default null,
  p_tpm int default null,
  p_rpd int default null,
  p_tpd int default null,
  p_window_seconds double precision default 60
) returns void
language sql
set search_path = ''
as $$
  insert into kyrie.model_budgets as b (model, window_seconds, rpm, tpm, rpd, tpd)
  values (p_model, p_window_seconds, p_rpm, p_tpm, p_rpd, p_tpd)
  on conflict (model) do update
    set window_seconds = excluded.window_seconds,
        rpm = coalesce(excluded.rpm, b.rpm),
        tpm = coalesce(excluded.tpm, b.tpm),
        rpd = coalesce(excluded.rpd, b.rpd),
        tpd = coalesce(excluded.tpd, b.tpd),
        requests_left = least(b.requests_left, coalesce(excluded.rpm, b.rpm)),
        tokens_left = least(b.tokens_left, coalesce(excluded.tpm, b.tpm)),
        day_requests_left = least(b.day_requests_left, coalesce(excluded.rpd, b.rpd)),
        day_tokens_left = least(b.day_tokens_left, coalesce(excluded.tpd, b.tpd))
$$;

-- Take one request and `p_tokens` estimated tokens from the model's budget,
-- or say how long to wait: returns 0 when granted (and taken), else the
-- seconds until every bucket would hold the request (nothing is taken).
--
-- One call, under the row's lock: two workers can never both take the last
-- request of a minute.  The clock is read after the lock (clock_timestamp,
-- not now()), so a caller that queued behind another does not refill the
-- buckets for time that the other already counted.
create or replace function kyrie.take_model_budget(p_model text, p_tokens int) returns double precision
language plpgsql
set search_path = ''
as $$
declare
  b kyrie.model_budgets;
  t timestamptz;
  elapsed double precision;
  day double precision;
  r double precision;
  tk double precision;
  dr double precision;
  dtk double precision;
  wait double precision;
  flying int;
  flying_tokens bigint;
begin
  insert into kyrie.model_budgets (model) values (p_model) on conflict (model) do nothing;
  select * into b from kyrie.model_budgets where model = p_model for update;
  t := clock_timestamp();
  elapsed := greatest(0, extract(epoch from t - b.refilled_at));
  day := b.window_seconds * 1440;
  flying := b.in_flight;
  flying_tokens := b.in_flight_tokens;
  if b.in_flight_at < t - make_interval(secs => b.window_seconds + 60) then
    flying := 0;  -- left by a killed worker (see the file's comment)
    flying_tokens := 0;
  end if;
  r := kyrie.budget_refill(b.requests_left, b.rpm, b.window_seconds, elapsed, b.headroom, flying);
  tk := kyrie.budget_refill(b.tokens_left, b.tpm, b.window_seconds, elapsed, b.headroom, flying_tokens);
  dr := kyrie.budget_refill(b.day_requests_left, b.rpd, day, elapsed, b.headroom);
  dtk := kyrie.budget_refill(b.day_tokens_left, b.tpd, day, elapsed, b.headroom);
  wait := greatest(
    kyrie.budget_wait(r, b.rpm, b.window_seconds, 1, b.headroom),
    kyrie.budget_wait(tk, b.tpm, b.window_seconds, p_tokens, b.headroom),
    kyrie.budget_wait(dr, b.rpd, day, 1, b.headroom),
    kyrie.budget_wait(dtk, b.tpd, day, p_tokens, b.headroom),
    coalesce(extract(epoch from b.blocked_until - t), 0)
  );
  if wait > 0 then
    return wait;
  end if;
  update kyrie.model_budgets
     set requests_left = r - 1,
         tokens_left = tk - p_tokens,
         day_requests_left = dr - 1,
         day_tokens_left = dtk - p_tokens,
         refilled_at = t,
         in_flight = flying + 1,
         in_flight_tokens = flying_tokens + p_tokens,
         in_flight_at = t
   where model = p_model;
  return 0;
end
$$;

-- After a response: give back what the estimate took beyond the real usage
-- (or take the excess), and believe the provider's headers.  Groq's
-- `x-ratelimit-limit-tokens` is the minute's tokens and
-- `x-ratelimit-limit-requests` the day's requests; their `remaining-*` are
-- the provider's own count, which wins when it is lower than ours (other
-- clients of the same organisation spend from it too).  Nulls (a header
-- missing, a failed request's usage) change nothing.
create or replace function kyrie.settle_model_call(
  p_model text,
  p_estimated_tokens int,
  p_used_tokens int,
  p_limit_requests int default null,
  p_remaining_requests int default null,
  p_limit_tokens int default null,
  p_remaining_tokens int default null,
  p_reset_requests double precision default null,
  p_reset_tokens double precision default null
) returns void
language plpgsql
set search_path = ''
as $$
declare
  b kyrie.model_budgets;
  t timestamptz;
  elapsed double precision;
  day double precision;
  back double precision;
  v_rpd int;
  v_tpm int;
begin
  insert into kyrie.model_budgets (model) values (p_model) on conflict (model) do nothing;
  select * into b from kyrie.model_budgets where model = p_model for update;
  t := clock_timestamp();
  elapsed := greatest(0, extract(epoch from t - b.refilled_at));
  day := b.window_seconds * 1440;
  back := coalesce(p_estimated_tokens - p_used_tokens, 0);
  v_rpd := coalesce(p_limit_requests, b.rpd);
  v_tpm := coalesce(p_limit_tokens, b.tpm);
  update kyrie.model_budgets
     set rpd = v_rpd,
         tpm = v_tpm,
         requests_left = kyrie.budget_refill(
           b.requests_left, b.rpm, b.window_seconds, elapsed, b.headroom, b.in_flight
         ),
         tokens_left = least(
           kyrie.budget_refill(
             least(b.tokens_left, v_tpm), v_tpm, b.window_seconds, elapsed, b.headroom, b.in_flight_tokens
           ) + back,
           p_remaining_tokens
         ),
         in_flight = greatest(b.in_flight - 1, 0),
         in_flight_tokens = greatest(b.in_flight_tokens - p_estimated_tokens, 0),
         in_flight_at = t,
         day_requests_left = least(
           kyrie.budget_refill(least(b.day_requests_left, v_rpd), v_rpd, day, elapsed, b.headroom),
           p_remaining_requests
         ),
         day_tokens_left = kyrie.budget_refill(b.day_tokens_left, b.tpd, day, elapsed, b.headroom) + back,
         refilled_at = t,
         headers_seen_at = case when p_limit_requests is not null or p_limit_tokens is not null
                                then t else b.headers_seen_at end,
         tokens_reset_at = coalesce(t + make_interval(secs => p_reset_tokens), b.tokens_reset_at),
         requests_reset_at = coalesce(t + make_interval(secs => p_reset_requests), b.requests_reset_at)
   where model = p_model;
end
$$;

-- A 429 all the same (another organisation member, a limit lowered since):
-- nobody asks again before the provider's retry-after.
create or replace function kyrie.model_rate_limited(p_model text, p_retry_after double precision) returns void
language sql
set search_path = ''
as $$
  insert into kyrie.model_budgets as b (model, blocked_until)
  values (p_model, clock_timestamp() + make_interval(secs => p_retry_after))
  on conflict (model) do update
    set blocked_until = greatest(b.blocked_until, excluded.blocked_until)
$$;

revoke execute on function
  kyrie.budget_refill(double precision, int, double precision, double precision, double precision,
                      double precision),
  kyrie.budget_wait(double precision, int, double precision, double precision, double precision),
  kyrie.seed_model_budget(text, int, int, int, int, double precision),
  kyrie.take_model_budget(text, int),
  kyrie.settle_model_call(text, int, int, int, int, int, int, double precision, double precision),
  kyrie.model_rate_limited(text, double precision)
from public, anon, authenticated, service_role;
