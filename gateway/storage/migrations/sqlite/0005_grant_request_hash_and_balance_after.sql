-- A grant's Idempotency-Key remembers what was asked (a hash of environment,
-- amount and reason) and what was answered (the balance right after it), so a
-- replay answers the first answer and a different request under the key is told apart.
ALTER TABLE credit_entries ADD COLUMN request_hash TEXT;
ALTER TABLE credit_entries ADD COLUMN balance_after INTEGER;
