-- The users service: accounts.
CREATE TABLE IF NOT EXISTS {{tables.accounts}} (
    id serial PRIMARY KEY,
    email text UNIQUE NOT NULL,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
