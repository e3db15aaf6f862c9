CREATE TABLE {{tables.authors}} (
  id serial PRIMARY KEY,
  name text NOT NULL UNIQUE
);

CREATE TABLE {{tables.notes}} (
  id serial PRIMARY KEY,
  author_id int NOT NULL REFERENCES {{tables.authors}} (id),
  body text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
