-- kyrie.worklog_notes reads the latest entries of one contract (newest
-- first, 20 by default).  Without an index in that order it walks the
-- workspace's (workspace_id, work_date) index backwards through every
-- contract's entries and sorts: 16 ms per call on 200,000 worklogs, called
-- for each contract an analysis looks into.  In the function's own order it
-- is a top-N index scan that stops after `p_limit` rows: under 3 ms.
--
-- Leading with contract_id also serves the composite foreign key's lookups
-- of a contract's worklogs (on delete cascade) as the older
-- (contract_id, workspace_id) index does; that one stays, it is the exact
-- match of the foreign key.

create index worklogs_contract_latest_idx
  on public.worklogs (contract_id, work_date desc, created_at desc, id);
