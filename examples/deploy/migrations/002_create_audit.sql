-- An audit trail, with one row written by the migration itself: a tenant migrated twice
-- would have two 'schema_migrated' rows.
CREATE TABLE {{tables.audit}} (
    id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);

INSERT INTO {{tables.audit}} (event) VALUES ('schema_migrated');
