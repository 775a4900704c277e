-- Migration 7: operator keys scoped to one project (`token create
-- --operator --project P`). Every key made before this read its whole
-- organization, whatever project it named, and keeps doing so.
ALTER TABLE tokens ADD COLUMN all_projects boolean NOT NULL DEFAULT true;
UPDATE tokens SET all_projects = false WHERE kind = 'device';
