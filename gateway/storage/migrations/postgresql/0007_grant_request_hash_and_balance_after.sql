-- See SQLite version 5: a grant's request hash and the balance it answered.
ALTER TABLE credit_entries ADD COLUMN request_hash text;
ALTER TABLE credit_entries ADD COLUMN balance_after bigint;
