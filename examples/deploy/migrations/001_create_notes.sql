-- One tenant's notes. The same file runs in every tenant schema: {{tables.notes}}
-- expands to "tenant_<name>".notes.
CREATE TABLE {{tables.notes}} (
    id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    body TEXT NOT NULL CHECK (length(body) BETWEEN 1 AND 10000),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
