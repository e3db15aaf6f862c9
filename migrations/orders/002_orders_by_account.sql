CREATE INDEX IF NOT EXISTS orders_by_account ON {{tables.orders}} (account_id, placed_at);
