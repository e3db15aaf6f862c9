/**
 * Migrations for racing migrators: each logs itself with its server process in
 * `applied_log`, and each would fail (or log twice) when run twice.
 */
export const RACE_FILES: Record<string, string> = {
  "001_log.sql": "CREATE TABLE {{tables.applied_log}} (filename text NOT NULL, pid int);\n" +
    "INSERT INTO {{tables.applied_log}} VALUES ('001_log.sql', pg_backend_pid());",
  "002_items.sql": "CREATE TABLE {{tables.items}} (id int PRIMARY KEY);\n" +
    "INSERT INTO {{tables.applied_log}} VALUES ('002_items.sql', pg_backend_pid());",
  "003_slow.sql": "SELECT pg_sleep(0.05);\n" +
    "INSERT INTO {{tables.items}} VALUES (3);\n" +
    "INSERT INTO {{tables.applied_log}} VALUES ('003_slow.sql', pg_backend_pid());",
  "004_column.sql": "ALTER TABLE {{tables.items}} ADD COLUMN note text;\n" +
    "INSERT INTO {{tables.applied_log}} VALUES ('004_column.sql', pg_backend_pid());",
  "005_more.sql": "INSERT INTO {{tables.items}} VALUES (5);\n" +
    "INSERT INTO {{tables.applied_log}} VALUES ('005_more.sql', pg_backend_pid());",
};
