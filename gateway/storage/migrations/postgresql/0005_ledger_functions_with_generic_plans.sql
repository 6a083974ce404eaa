-- PL/pgSQL plans each statement per call ("custom plans") for as long as it
-- thinks that is cheaper than one cached plan; for these functions it kept
-- doing so, and planning their six statements cost more than running them
-- (measured on a batch of one: 1.48 ms a reserve with its commit, 1.08 ms
-- with cached plans). Their statements look rows up by key only, and
-- migration 4 already rules out sequential scans, so one cached plan fits
-- every call.
ALTER FUNCTION gateway_reserve(text[], text[], text[], text[], integer[], double precision,
                               text[], text[], text[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION gateway_resolve(text[], integer[], text) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION gateway_claim_idempotency(text, text, text, text, text)
    SET plan_cache_mode = force_generic_plan;
