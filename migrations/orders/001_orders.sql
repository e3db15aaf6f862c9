-- The orders service: orders refer to accounts by id (another service's schema).
CREATE TABLE IF NOT EXISTS {{tables.orders}} (
    id serial PRIMARY KEY,
    account_id int NOT NULL,
    total numeric(10, 2) NOT NULL CHECK (total >= 0),
    placed_at timestamptz NOT NULL DEFAULT now()
);
