-- Migration 9: operator keys scoped to one project (`token create
-- --operator --project P`). Every key made before this read its whole
-- organization, whatever project it named, and keeps doing so.
ALTER TABLE tokens ADD COLUMN all_projects INTEGER NOT NULL DEFAULT 1;
UPDATE tokens SET all_projects = 0 WHERE kind = 'device';
