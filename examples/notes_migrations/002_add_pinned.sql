ALTER TABLE {{tables.notes}} ADD COLUMN pinned boolean NOT NULL DEFAULT false;
CREATE INDEX notes_author_idx ON {{tables.notes}} (author_id, pinned);
